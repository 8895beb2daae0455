from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    OK: _ClassVar[Reason]
    MALFORMED: _ClassVar[Reason]
    UNSUPPORTED_ALGORITHM: _ClassVar[Reason]
    UNSUPPORTED_HEADER: _ClassVar[Reason]
    UNKNOWN_KEY: _ClassVar[Reason]
    BAD_SIGNATURE: _ClassVar[Reason]
    EXPIRED: _ClassVar[Reason]
    NOT_YET_VALID: _ClassVar[Reason]
    ISSUED_IN_FUTURE: _ClassVar[Reason]
    MISSING_CLAIM: _ClassVar[Reason]
    INVALID_CLAIM: _ClassVar[Reason]
    ISSUER_MISMATCH: _ClassVar[Reason]
    AUDIENCE_MISMATCH: _ClassVar[Reason]
    TENANT_MISMATCH: _ClassVar[Reason]
    REVOKED: _ClassVar[Reason]
    KEY_REVOKED: _ClassVar[Reason]
    KEY_INACTIVE: _ClassVar[Reason]
    UNTRUSTED_ISSUER: _ClassVar[Reason]
    REVOCATION_UNAVAILABLE: _ClassVar[Reason]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    INVALID_FIELD: _ClassVar[ErrorReason]
    RESERVED_CLAIM: _ClassVar[ErrorReason]
    LIFETIME_EXCEEDS_POLICY: _ClassVar[ErrorReason]
    BATCH_TOO_LARGE: _ClassVar[ErrorReason]
    INVALID_CLAIMS: _ClassVar[ErrorReason]
    TENANT_NOT_FOUND: _ClassVar[ErrorReason]
    TENANT_EXISTS: _ClassVar[ErrorReason]
    KEY_NOT_FOUND: _ClassVar[ErrorReason]
    INVALID_KEY_TRANSITION: _ClassVar[ErrorReason]
    NO_ACTIVE_KEY: _ClassVar[ErrorReason]
    HSM_UNAVAILABLE: _ClassVar[ErrorReason]
    STORE_UNAVAILABLE: _ClassVar[ErrorReason]
    AUDIT_UNAVAILABLE: _ClassVar[ErrorReason]
    PERMISSION_DENIED: _ClassVar[ErrorReason]
    INVALID_TOKEN: _ClassVar[ErrorReason]
    INTERNAL_ERROR: _ClassVar[ErrorReason]
    POLICY_VIOLATION: _ClassVar[ErrorReason]
    NOT_FOUND: _ClassVar[ErrorReason]
    ALREADY_EXISTS: _ClassVar[ErrorReason]
    FAILED_PRECONDITION: _ClassVar[ErrorReason]
    UNAVAILABLE: _ClassVar[ErrorReason]
    UNAUTHENTICATED: _ClassVar[ErrorReason]
    MALFORMED_REQUEST: _ClassVar[ErrorReason]
    GRACE_NOT_OVER: _ClassVar[ErrorReason]
    ROLE_NOT_GRANTED: _ClassVar[ErrorReason]
    TENANT_NOT_GRANTED: _ClassVar[ErrorReason]
    AUDIENCE_NOT_GRANTED: _ClassVar[ErrorReason]
    LIFETIME_NOT_GRANTED: _ClassVar[ErrorReason]
    GRANT_NOT_FOUND: _ClassVar[ErrorReason]
    ISSUER_NOT_TRUSTED: _ClassVar[ErrorReason]
    SUBJECT_TOKEN_INVALID: _ClassVar[ErrorReason]

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    PENDING: _ClassVar[KeyState]
    ACTIVE: _ClassVar[KeyState]
    RETIRING: _ClassVar[KeyState]
    RETIRED: _ClassVar[KeyState]
    DESTROYED: _ClassVar[KeyState]
    COMPROMISED: _ClassVar[KeyState]
REASON_UNSPECIFIED: Reason
OK: Reason
MALFORMED: Reason
UNSUPPORTED_ALGORITHM: Reason
UNSUPPORTED_HEADER: Reason
UNKNOWN_KEY: Reason
BAD_SIGNATURE: Reason
EXPIRED: Reason
NOT_YET_VALID: Reason
ISSUED_IN_FUTURE: Reason
MISSING_CLAIM: Reason
INVALID_CLAIM: Reason
ISSUER_MISMATCH: Reason
AUDIENCE_MISMATCH: Reason
TENANT_MISMATCH: Reason
REVOKED: Reason
KEY_REVOKED: Reason
KEY_INACTIVE: Reason
UNTRUSTED_ISSUER: Reason
REVOCATION_UNAVAILABLE: Reason
ERROR_REASON_UNSPECIFIED: ErrorReason
INVALID_FIELD: ErrorReason
RESERVED_CLAIM: ErrorReason
LIFETIME_EXCEEDS_POLICY: ErrorReason
BATCH_TOO_LARGE: ErrorReason
INVALID_CLAIMS: ErrorReason
TENANT_NOT_FOUND: ErrorReason
TENANT_EXISTS: ErrorReason
KEY_NOT_FOUND: ErrorReason
INVALID_KEY_TRANSITION: ErrorReason
NO_ACTIVE_KEY: ErrorReason
HSM_UNAVAILABLE: ErrorReason
STORE_UNAVAILABLE: ErrorReason
AUDIT_UNAVAILABLE: ErrorReason
PERMISSION_DENIED: ErrorReason
INVALID_TOKEN: ErrorReason
INTERNAL_ERROR: ErrorReason
POLICY_VIOLATION: ErrorReason
NOT_FOUND: ErrorReason
ALREADY_EXISTS: ErrorReason
FAILED_PRECONDITION: ErrorReason
UNAVAILABLE: ErrorReason
UNAUTHENTICATED: ErrorReason
MALFORMED_REQUEST: ErrorReason
GRACE_NOT_OVER: ErrorReason
ROLE_NOT_GRANTED: ErrorReason
TENANT_NOT_GRANTED: ErrorReason
AUDIENCE_NOT_GRANTED: ErrorReason
LIFETIME_NOT_GRANTED: ErrorReason
GRANT_NOT_FOUND: ErrorReason
ISSUER_NOT_TRUSTED: ErrorReason
SUBJECT_TOKEN_INVALID: ErrorReason
KEY_STATE_UNSPECIFIED: KeyState
PENDING: KeyState
ACTIVE: KeyState
RETIRING: KeyState
RETIRED: KeyState
DESTROYED: KeyState
COMPROMISED: KeyState

class ErrorDetail(_message.Message):
    __slots__ = ("reason", "field", "tenant", "kid", "request_id", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: ErrorReason
    field: str
    tenant: str
    kid: str
    request_id: str
    message: str
    def __init__(self, reason: _Optional[_Union[ErrorReason, str]] = ..., field: _Optional[str] = ..., tenant: _Optional[str] = ..., kid: _Optional[str] = ..., request_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("kid", "tenant", "alg", "key_size", "state", "public_jwk_json", "created_at", "activated_at", "retiring_at", "retired_at", "compromised_at", "hsm_label")
    KID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALG_FIELD_NUMBER: _ClassVar[int]
    KEY_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_JWK_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_AT_FIELD_NUMBER: _ClassVar[int]
    RETIRING_AT_FIELD_NUMBER: _ClassVar[int]
    RETIRED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPROMISED_AT_FIELD_NUMBER: _ClassVar[int]
    HSM_LABEL_FIELD_NUMBER: _ClassVar[int]
    kid: str
    tenant: str
    alg: str
    key_size: int
    state: KeyState
    public_jwk_json: str
    created_at: int
    activated_at: int
    retiring_at: int
    retired_at: int
    compromised_at: int
    hsm_label: str
    def __init__(self, kid: _Optional[str] = ..., tenant: _Optional[str] = ..., alg: _Optional[str] = ..., key_size: _Optional[int] = ..., state: _Optional[_Union[KeyState, str]] = ..., public_jwk_json: _Optional[str] = ..., created_at: _Optional[int] = ..., activated_at: _Optional[int] = ..., retiring_at: _Optional[int] = ..., retired_at: _Optional[int] = ..., compromised_at: _Optional[int] = ..., hsm_label: _Optional[str] = ...) -> None: ...
