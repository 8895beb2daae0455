"""Maps fedtoken errors to a gRPC status plus a typed ErrorDetail.

Every servicer method is wrapped by ``rpc_boundary``: a ``FedtokenError``
becomes its status with an ``ErrorDetail`` in the trailing metadata entry
``fedtoken-error-bin`` (and the reason name in ``fedtoken-reason``); anything
else becomes INTERNAL with a request id that is logged with the traceback.
No stack trace, token or secret ever reaches the caller.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from fedtoken.core.errors import ErrorReason, FedtokenError, StatusClass
from fedtoken_client._pb.fedtoken.v1 import common_pb2

log = logging.getLogger("fedtoken.rpc")

ERROR_DETAIL_KEY = "fedtoken-error-bin"
REASON_KEY = "fedtoken-reason"
REQUEST_ID_KEY = "x-request-id"

_STATUS = {s: getattr(grpc.StatusCode, s.value) for s in StatusClass}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and 0 < len(value) <= 64 \
                and value.isprintable():
            return value
    return uuid.uuid4().hex


def detail_for(exc: FedtokenError, request_id: str) -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(
        reason=common_pb2.ErrorReason.Value(exc.reason.value),  # type: ignore[arg-type]
        field=exc.field,
        tenant=exc.tenant,
        kid=exc.kid,
        request_id=request_id,
        message=exc.message,
    )


def rpc_boundary(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Translate errors raised by a servicer method into a status + detail."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except FedtokenError as exc:
            request_id = request_id_of(context)
            status = _STATUS[exc.status]
            if exc.status in (StatusClass.UNAVAILABLE, StatusClass.INTERNAL):
                log.warning("%s %s failed: %s (%s) request_id=%s", method.__name__,
                            status.name, exc.reason.value, exc.message, request_id,
                            exc_info=exc.__cause__ is not None)
            await _abort(context, status, exc, request_id)
        except (grpc.aio.AbortError, AssertionError):
            raise
        except Exception:
            request_id = request_id_of(context)
            log.exception("%s failed unexpectedly; request_id=%s", method.__name__, request_id)
            internal = FedtokenError(
                f"internal error; the server log has the details under request_id {request_id}",
                reason=ErrorReason.INTERNAL_ERROR,
            )
            await _abort(context, grpc.StatusCode.INTERNAL, internal, request_id)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, status: grpc.StatusCode,
                 exc: FedtokenError, request_id: str) -> None:
    detail = detail_for(exc, request_id)
    await context.abort(
        status,
        exc.message,
        trailing_metadata=(
            (ERROR_DETAIL_KEY, detail.SerializeToString()),
            (REASON_KEY, exc.reason.value),
        ),
    )
