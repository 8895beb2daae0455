"""fedtoken's Python client: generated stubs (``fedtoken_client._pb``) and a typed client."""

from fedtoken_client.client import AsyncFedtokenClient, FedtokenClient, Tls, reason_name
from fedtoken_client.errors import FedtokenRpcError, from_rpc_error

__all__ = [
    "AsyncFedtokenClient",
    "FedtokenClient",
    "FedtokenRpcError",
    "Tls",
    "from_rpc_error",
    "reason_name",
]
