"""The gRPC boundary, as server interceptors.

``Boundary`` wraps every unary method once (the wrapped handler is cached per
method, so the per-call cost is one dict lookup):

1. it makes the call's ``CallContext`` exactly once: a request id (the
   caller's ``x-request-id`` when it is short and printable, else a new one)
   and a ``Principal``: the verified identity (``authenticate``: the SPIFFE
   ID of the mTLS client certificate; a call without one is UNAUTHENTICATED
   before the servicer runs), the peer address and the self-declared name
   (recorded, never trusted). gRPC's aio interceptors cannot see the peer's
   certificate, so authentication happens here, in the wrapped handler;
2. it runs the servicer with that context available through
   ``call_context()``;
3. it maps errors: a ``FedtokenError`` becomes its status with a typed
   ``ErrorDetail`` in the trailing metadata entry ``fedtoken-error-bin``
   (and the reason name in ``fedtoken-reason``); anything else becomes
   INTERNAL with the request id, logged with its traceback. No stack trace,
   token or secret ever reaches the caller.

Metrics and authentication interceptors slot in beside it (``interceptors``
in ``fedtoken.app``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import grpc

from fedtoken.core.errors import ErrorReason, FedtokenError, InvalidRequest, StatusClass
from fedtoken.core.ports import CallContext, Principal
from fedtoken_client._pb.fedtoken.v1 import common_pb2

log = logging.getLogger("fedtoken.rpc")

ERROR_DETAIL_KEY = "fedtoken-error-bin"
REASON_KEY = "fedtoken-reason"
REQUEST_ID_KEY = "x-request-id"
CALLER_KEY = "x-fedtoken-caller"
MAX_MESSAGE_IN_DETAIL = 512

_STATUS = {s: getattr(grpc.StatusCode, s.value) for s in StatusClass}
_CALL: contextvars.ContextVar[CallContext] = contextvars.ContextVar("fedtoken_call")

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class _Undecodable:
    """Stands in for a request whose bytes did not decode (see ``_safe``)."""


_UNDECODABLE = _Undecodable()


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that never raises: grpc would answer UNKNOWN naming the
    Python exception; the boundary answers INVALID_ARGUMENT MALFORMED_REQUEST."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError, UnicodeDecodeError, ...
            return _UNDECODABLE

    return decode


def call_context() -> CallContext:
    """The context of the RPC being served (set by ``Boundary``)."""
    return _CALL.get()


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 64 \
                and value.isprintable():
            return value
    return uuid.uuid4().hex


def _declared(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == CALLER_KEY and isinstance(value, str):
            return "".join(c for c in value[:128] if c.isprintable())
    return ""


# Reads the caller's verified identity from the call (the mTLS client
# certificate's SPIFFE ID); raises Unauthenticated when there is none.
Authenticate = Callable[[grpc.aio.ServicerContext], str]


def detail_for(exc: FedtokenError, request_id: str) -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(
        reason=common_pb2.ErrorReason.Value(exc.reason.value),  # type: ignore[arg-type]
        field=exc.field[:64],
        tenant=exc.tenant[:64],
        kid=exc.kid[:128],
        request_id=request_id,
        message=exc.message[:MAX_MESSAGE_IN_DETAIL],
    )


async def _abort(context: grpc.aio.ServicerContext, status: grpc.StatusCode,
                 exc: FedtokenError, request_id: str) -> None:
    detail = detail_for(exc, request_id)
    await context.abort(
        status,
        detail.message,
        trailing_metadata=(
            (ERROR_DETAIL_KEY, detail.SerializeToString()),
            (REASON_KEY, exc.reason.value),
        ),
    )


# Bounds the database waits of one call by the caller's remaining deadline
# (seconds, None when the caller set none); injected by the composition root.
DeadlineScope = Callable[[float | None], AbstractContextManager[None]]


def _no_scope(_remaining: float | None) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def wrap_unary(name: str, behavior: Behavior,
               authenticate: Authenticate | None = None,
               deadline_scope: DeadlineScope = _no_scope) -> Behavior:
    """``behavior`` with authentication, a CallContext and error mapping around it.

    Without ``authenticate`` (insecure mode, explicitly configured, loopback
    only) the principal has no identity, so the authorizer denies every call
    that needs a role.
    """

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = context.invocation_metadata()
        request_id = _request_id(metadata)
        token: contextvars.Token[CallContext] | None = None
        try:
            identity = authenticate(context) if authenticate is not None else ""
            ctx = CallContext(Principal(identity, context.peer() or "", _declared(metadata)),
                              request_id, name)
            token = _CALL.set(ctx)
            if request is _UNDECODABLE:
                raise InvalidRequest("the request message could not be decoded",
                                     reason=ErrorReason.MALFORMED_REQUEST)
            with deadline_scope(context.time_remaining()):
                return await behavior(request, context)
        except FedtokenError as exc:
            status = _STATUS[exc.status]
            if exc.status in (StatusClass.UNAVAILABLE, StatusClass.INTERNAL):
                log.warning("%s %s failed: %s (%s) request_id=%s", name, status.name,
                            exc.reason.value, exc.message, request_id,
                            exc_info=exc.__cause__ is not None)
            await _abort(context, status, exc, request_id)
        except (grpc.aio.AbortError, AssertionError):
            raise
        except Exception:
            log.exception("%s failed unexpectedly; request_id=%s", name, request_id)
            internal = FedtokenError(
                "internal error; the server log has the details under request_id "
                f"{request_id}",
                reason=ErrorReason.INTERNAL_ERROR,
            )
            await _abort(context, grpc.StatusCode.INTERNAL, internal, request_id)
        finally:
            if token is not None:
                _CALL.reset(token)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return handler


class Boundary(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Request id, principal and error mapping for every unary method."""

    def __init__(self, authenticate: Authenticate | None = None, *,
                 deadline_scope: DeadlineScope = _no_scope) -> None:
        self._authenticate = authenticate
        self._deadline_scope = deadline_scope
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown method (UNIMPLEMENTED) or a streaming one
        wrapped = grpc.unary_unary_rpc_method_handler(
            wrap_unary(method.rpartition("/")[2], handler.unary_unary, self._authenticate,
                       self._deadline_scope),
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped
