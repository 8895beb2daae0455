"""Typed errors rebuilt from fedtoken's gRPC statuses.

The server puts an ``ErrorDetail`` in the trailing metadata entry
``fedtoken-error-bin``; ``from_rpc_error`` turns a failed call into a
``FedtokenRpcError`` whose ``reason`` is the stable ``ErrorReason`` name.
"""

from __future__ import annotations

import grpc

from fedtoken_client._pb.fedtoken.v1 import common_pb2

ERROR_DETAIL_KEY = "fedtoken-error-bin"


class FedtokenRpcError(Exception):
    """A fedtoken call failed; switch on ``code`` and ``reason``, not the message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str,
                 detail: common_pb2.ErrorDetail | None) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.detail = detail or common_pb2.ErrorDetail()

    @property
    def field(self) -> str:
        return self.detail.field

    @property
    def request_id(self) -> str:
        return self.detail.request_id


def from_rpc_error(exc: grpc.RpcError) -> FedtokenRpcError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = exc.details() if hasattr(exc, "details") else str(exc)
    detail: common_pb2.ErrorDetail | None = None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_DETAIL_KEY and isinstance(value, bytes):
            detail = common_pb2.ErrorDetail.FromString(value)
    reason = (
        common_pb2.ErrorReason.Name(detail.reason) if detail is not None
        else "ERROR_REASON_UNSPECIFIED"
    )
    return FedtokenRpcError(code, reason, message or "", detail)
