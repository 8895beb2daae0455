"""The error hierarchy of fedtoken, with stable reason codes.

Every refusal the service makes is a ``FedtokenError`` carrying an
``ErrorReason`` (the same names as ``fedtoken.v1.ErrorReason`` in the proto)
and a ``StatusClass`` (our own mirror of the gRPC status codes, so the core
never imports grpc). ``fedtoken.rpc.interceptors`` maps them to a gRPC status plus
an ``ErrorDetail`` at one boundary. Tests assert reasons, never messages.

Adapters translate their library's exceptions where they enter (PKCS#11
return codes in ``fedtoken.hsm``, asyncpg SQLSTATE classes in
``fedtoken.store``) and re-raise ``from exc``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a sibling in core: no upward import
    from fedtoken.core.model import Reason


class StatusClass(enum.Enum):
    """The gRPC status an error maps to (names match grpc.StatusCode)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


class ErrorReason(enum.Enum):
    """Stable reason codes; names equal ``fedtoken.v1.ErrorReason``."""

    INVALID_FIELD = "INVALID_FIELD"
    RESERVED_CLAIM = "RESERVED_CLAIM"
    LIFETIME_EXCEEDS_POLICY = "LIFETIME_EXCEEDS_POLICY"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    INVALID_CLAIMS = "INVALID_CLAIMS"
    TENANT_NOT_FOUND = "TENANT_NOT_FOUND"
    TENANT_EXISTS = "TENANT_EXISTS"
    KEY_NOT_FOUND = "KEY_NOT_FOUND"
    INVALID_KEY_TRANSITION = "INVALID_KEY_TRANSITION"
    NO_ACTIVE_KEY = "NO_ACTIVE_KEY"
    HSM_UNAVAILABLE = "HSM_UNAVAILABLE"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    AUDIT_UNAVAILABLE = "AUDIT_UNAVAILABLE"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INVALID_TOKEN = "INVALID_TOKEN"  # noqa: S105 - a reason code
    INTERNAL_ERROR = "INTERNAL_ERROR"
    POLICY_VIOLATION = "POLICY_VIOLATION"
    # Generic reasons of the generic classes; raise sites name a specific one
    # whenever they know it.
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    GRACE_NOT_OVER = "GRACE_NOT_OVER"
    ROLE_NOT_GRANTED = "ROLE_NOT_GRANTED"
    TENANT_NOT_GRANTED = "TENANT_NOT_GRANTED"
    AUDIENCE_NOT_GRANTED = "AUDIENCE_NOT_GRANTED"
    LIFETIME_NOT_GRANTED = "LIFETIME_NOT_GRANTED"
    GRANT_NOT_FOUND = "GRANT_NOT_FOUND"
    ISSUER_NOT_TRUSTED = "ISSUER_NOT_TRUSTED"
    SUBJECT_TOKEN_INVALID = "SUBJECT_TOKEN_INVALID"  # noqa: S105 - a reason code


class FedtokenError(Exception):
    """Root of every error fedtoken raises on purpose."""

    status: StatusClass = StatusClass.INTERNAL
    reason: ErrorReason = ErrorReason.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        reason: ErrorReason | None = None,
        field: str = "",
        tenant: str = "",
        kid: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.field = field
        self.tenant = tenant
        self.kid = kid


# --- the caller asked for something wrong -------------------------------------


class InvalidRequest(FedtokenError):
    """A request field is missing, malformed or out of range."""

    status = StatusClass.INVALID_ARGUMENT
    reason = ErrorReason.INVALID_FIELD


class PolicyViolation(InvalidRequest):
    """An algorithm, key size, lifetime or claim breaks the tenant's policy."""

    reason = ErrorReason.POLICY_VIOLATION


class NotFound(FedtokenError):
    """A named thing does not exist."""

    status = StatusClass.NOT_FOUND
    reason = ErrorReason.NOT_FOUND


class TenantNotFound(NotFound):
    """The named tenant does not exist."""

    reason = ErrorReason.TENANT_NOT_FOUND


class KeyNotFound(NotFound):
    """The named key does not exist (for that tenant)."""

    reason = ErrorReason.KEY_NOT_FOUND


class AlreadyExists(FedtokenError):
    """The thing to create exists already."""

    status = StatusClass.ALREADY_EXISTS
    reason = ErrorReason.ALREADY_EXISTS


class TenantExists(AlreadyExists):
    """A tenant with this id or issuer exists already."""

    reason = ErrorReason.TENANT_EXISTS


class FailedPrecondition(FedtokenError):
    """The system's state does not allow the operation."""

    status = StatusClass.FAILED_PRECONDITION
    reason = ErrorReason.FAILED_PRECONDITION


class InvalidKeyTransition(FailedPrecondition):
    """The key's state does not allow the requested transition."""

    reason = ErrorReason.INVALID_KEY_TRANSITION


class NoActiveKey(FailedPrecondition):
    """The tenant has no signing key."""

    reason = ErrorReason.NO_ACTIVE_KEY


class PermissionDenied(FedtokenError):
    """The caller is not allowed to do this."""

    status = StatusClass.PERMISSION_DENIED
    reason = ErrorReason.PERMISSION_DENIED


class Unauthenticated(FedtokenError):
    """The caller did not prove who it is."""

    status = StatusClass.UNAUTHENTICATED
    reason = ErrorReason.UNAUTHENTICATED


# --- a dependency failed (the operation did not happen) -----------------------


class Unavailable(FedtokenError):
    """A dependency is down; nothing was changed, retrying may succeed."""

    status = StatusClass.UNAVAILABLE
    reason = ErrorReason.UNAVAILABLE


class HsmUnavailable(Unavailable):
    """The HSM cannot be reached or refused to sign; nothing was signed."""

    reason = ErrorReason.HSM_UNAVAILABLE


class StoreUnavailable(Unavailable):
    """Postgres cannot be reached or failed the statement."""

    reason = ErrorReason.STORE_UNAVAILABLE


class AuditUnavailable(Unavailable):
    """The audit record could not be made durable, so the operation was refused."""

    reason = ErrorReason.AUDIT_UNAVAILABLE


# --- token parsing (core) -----------------------------------------------------


class TokenError(FedtokenError):
    """A token could not be parsed or failed a check.

    Carries a verdict ``Reason`` (see ``fedtoken.core.model.Reason``) rather
    than an ErrorReason; the verifier turns it into a Verdict, never into a
    failed RPC.
    """

    status = StatusClass.INVALID_ARGUMENT
    reason = ErrorReason.INVALID_TOKEN

    def __init__(self, verdict_reason: Reason, message: str) -> None:
        super().__init__(message)
        self.verdict_reason = verdict_reason
