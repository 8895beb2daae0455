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

4. it observes the call once it ends, whatever the outcome:
   ``fedtoken.ops.metrics.observe_rpc(method, status name, seconds)`` and one
   access record on the logger ``fedtoken.rpc.access`` with the request-scoped
   fields ``request_id``, ``method`` (``/package.Service/Name``),
   ``principal`` (the SPIFFE ID, or "anonymous"), ``tenant`` (only the
   request message's own ``tenant`` field, when it has one: at most 63
   characters of ``[A-Za-z0-9._-]``, never anything read from a token),
   ``outcome`` (the gRPC status name), ``code`` (the fedtoken reason of a
   failure) and ``duration_ms``. Failures are logged at INFO, successes at
   DEBUG: an INFO line per successful call would cost a formatted, written
   line at every one of thousands of calls per second and drown the
   failures; the metrics count the successes. With DEBUG off the success
   path pays two clock reads, one ``isEnabledFor`` check (cached by
   logging) and the metrics observation: about 0.3 µs of its own plus
   ~1.6 µs in ``observe_rpc`` (prometheus-client's multiprocess histogram,
   two locked writes to its memory-mapped file) on the machine it was
   measured on (``python -m tests.unit.test_logs``). The access record's
   fields are only gathered when it is logged.

The success path is kept lean (it is most of a unary Verify's own time): one
pass over the metadata finds the request id and the declared name, a new
request id is 16 random bytes in hex (``uuid4().hex``'s format without the
UUID object), and the frozen ``Principal`` of a (identity, peer, declared)
triple is reused across that connection's calls (a bounded map per method;
the identity itself is still read from the call's own certificate every
call, and authorization is decided per call against the current policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import grpc

from fedtoken.core.errors import ErrorReason, FedtokenError, InvalidRequest, StatusClass
from fedtoken.core.ports import CallContext, Principal
from fedtoken.ops import metrics
from fedtoken_client._pb.fedtoken.v1 import common_pb2

log = logging.getLogger("fedtoken.rpc")
# One record per RPC (see the module docstring): its own logger, so operators
# can raise or lower it apart from the rest.
access_log = logging.getLogger("fedtoken.rpc.access")
ANONYMOUS = "anonymous"
MAX_TENANT_IN_LOG = 63

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


def new_request_id() -> str:
    """A fresh request id: 32 lowercase hex digits, random, with the UUID
    version 4 and variant bits set (what ``uuid.uuid4().hex`` gives, at a
    fraction of its cost)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


def _valid_request_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable()


def _clean_declared(value: str) -> str:
    return value[:128] if value[:128].isprintable() else \
        "".join(c for c in value[:128] if c.isprintable())


def _scan(metadata: Any) -> tuple[str, str]:
    """(request id, declared caller) from the invocation metadata in one
    pass: the first ``x-request-id`` that is short and printable (else a new
    id) and the first ``x-fedtoken-caller``, its unprintable characters
    dropped (else "")."""
    request_id = ""
    declared: str | None = None
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if not request_id and _valid_request_id(value):
                request_id = value
        elif key == CALLER_KEY and declared is None and isinstance(value, str):
            declared = _clean_declared(value)
    return request_id or new_request_id(), declared or ""




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


# Distinct (identity, peer, declared) principals kept per wrapped method: one
# per live connection in practice; the map is emptied when it reaches this.
MAX_PRINCIPALS = 1024


_TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _request_tenant(request: Any) -> str:
    """The request message's own ``tenant`` field for the access log ("" when
    it has none): its first 63 characters, anything but ``[A-Za-z0-9._-]``
    replaced by ``?`` (a log line must not carry what a caller typed)."""
    value = getattr(request, "tenant", "")
    if not isinstance(value, str) or not value:
        return ""
    value = value[:MAX_TENANT_IN_LOG]
    return value if _TENANT_CHARS.issuperset(value) else \
        "".join(c if c in _TENANT_CHARS else "?" for c in value)


def _aborted_status(context: grpc.aio.ServicerContext) -> str:
    """The status name a servicer's own ``context.abort`` set ("UNKNOWN" if unreadable)."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - a test double, or grpc internals changed
        return "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return "UNKNOWN"


def _access(level: int, method: str, request_id: str, principal: Principal | None,
            request: Any, outcome: str, code: str, seconds: float) -> None:
    extra = {
        "request_id": request_id,
        "method": method,
        "principal": principal.identity if principal is not None and principal.identity
        else ANONYMOUS,
        "outcome": outcome,
        "duration_ms": round(seconds * 1000, 3),
    }
    tenant = _request_tenant(request) if request is not _UNDECODABLE else ""
    if tenant:
        extra["tenant"] = tenant
    if code:
        extra["code"] = code
    access_log.log(level, "%s %s %s %.3fms", method, outcome, code or "-",
                   seconds * 1000, extra=extra)


def wrap_unary(name: str, behavior: Behavior,
               authenticate: Authenticate | None = None,
               deadline_scope: DeadlineScope = _no_scope, *,
               method: str = "") -> Behavior:
    """``behavior`` with authentication, a CallContext, error mapping and
    the per-call observation (metrics, access log) around it.

    ``method`` is the full ``/package.Service/Name`` the metrics and the
    access log name (``name``, the short one, is the CallContext's; it
    stands in when ``method`` is not given).

    Without ``authenticate`` (insecure mode, explicitly configured, loopback
    only) the principal has no identity, so the authorizer denies every call
    that needs a role.
    """
    # Principal is frozen: equal triples may share one instance. The identity
    # in the key comes from this call's own certificate (``authenticate``).
    principals: dict[tuple[str, str, str], Principal] = {}
    full = method or name
    observe = metrics.observe_rpc
    perf = time.perf_counter
    debug_on = access_log.isEnabledFor

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = perf()
        request_id, declared = _scan(context.invocation_metadata())
        token: contextvars.Token[CallContext] | None = None
        principal: Principal | None = None
        outcome = "UNKNOWN"
        code = ""
        try:
            identity = authenticate(context) if authenticate is not None else ""
            key = (identity, context.peer() or "", declared)
            principal = principals.get(key)
            if principal is None:
                if len(principals) >= MAX_PRINCIPALS:
                    principals.clear()
                principal = principals[key] = Principal(*key)
            token = _CALL.set(CallContext(principal, request_id, name))
            if request is _UNDECODABLE:
                raise InvalidRequest("the request message could not be decoded",
                                     reason=ErrorReason.MALFORMED_REQUEST)
            with deadline_scope(context.time_remaining()):
                response = await behavior(request, context)
            outcome = "OK"
            return response
        except FedtokenError as exc:
            status = _STATUS[exc.status]
            outcome, code = status.name, exc.reason.value
            if exc.status in (StatusClass.UNAVAILABLE, StatusClass.INTERNAL):
                log.warning("%s %s failed: %s (%s) request_id=%s", name, status.name,
                            exc.reason.value, exc.message, request_id,
                            exc_info=exc.__cause__ is not None)
            await _abort(context, status, exc, request_id)
        except grpc.aio.AbortError:
            outcome = _aborted_status(context)
            raise
        except AssertionError:
            raise
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        except Exception:
            outcome, code = "INTERNAL", ErrorReason.INTERNAL_ERROR.value
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
            seconds = perf() - start
            observe(full, outcome, seconds)
            if outcome != "OK":
                _access(logging.INFO, full, request_id, principal, request, outcome, code,
                        seconds)
            elif debug_on(logging.DEBUG):
                _access(logging.DEBUG, full, request_id, principal, request, outcome, code,
                        seconds)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return handler


class Boundary(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Request id, principal and error mapping for every unary method.

    Two ways to put it around the servicers, with the same wrapped handlers:
    as a server interceptor (``grpc.aio.server(interceptors=[boundary])``:
    grpc then runs ``intercept_service`` on every call, a few coroutines per
    call), or at registration (``boundary.register(add_X_to_server, servicer,
    server)`` on a server without interceptors: the wrapped handlers are what
    grpc dispatches to, nothing runs per call but the wrapper itself).
    """

    def __init__(self, authenticate: Authenticate | None = None, *,
                 deadline_scope: DeadlineScope = _no_scope) -> None:
        self._authenticate = authenticate
        self._deadline_scope = deadline_scope
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler | None
             ) -> grpc.RpcMethodHandler | None:
        """``handler`` of ``method`` (``/package.Service/Name``) with the
        boundary around it: unary-unary handlers only (others, and None, as
        they are). One wrapped handler per method, made once."""
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        if handler is None or handler.unary_unary is None:
            return handler  # unknown method (UNIMPLEMENTED) or a streaming one
        wrapped = grpc.unary_unary_rpc_method_handler(
            wrap_unary(method.rpartition("/")[2], handler.unary_unary, self._authenticate,
                       self._deadline_scope, method=method),
            request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        return self.wrap(method, await continuation(handler_call_details))

    def register(self, add_to_server: Callable[[Any, Any], None], servicer: Any,
                 server: grpc.aio.Server) -> None:
        """``add_to_server(servicer, server)`` (a generated
        ``add_*Servicer_to_server``) with every unary method it registers
        wrapped by this boundary, for a server created without it as an
        interceptor."""
        add_to_server(servicer, _Registrar(server, self))


class _WrappedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose method handlers come out wrapped."""

    def __init__(self, inner: grpc.GenericRpcHandler, boundary: Boundary) -> None:
        self._inner = inner
        self._boundary = boundary

    def service(self, handler_call_details: grpc.HandlerCallDetails
                ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        cached = self._boundary._wrapped.get(method)
        if cached is not None:
            return cached
        return self._boundary.wrap(method, self._inner.service(handler_call_details))


class _Registrar:
    """Stands in for the server a generated ``add_*_to_server`` registers on
    (the two methods it calls), wrapping what it registers."""

    def __init__(self, server: grpc.aio.Server, boundary: Boundary) -> None:
        self._server = server
        self._boundary = boundary

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(h, self._boundary) for h in handlers))

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._boundary.wrap(f"/{service}/{name}", h)
                      for name, h in handlers.items()})
