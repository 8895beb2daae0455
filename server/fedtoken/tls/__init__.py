"""Transport security: the development CA, gRPC credentials that pick up
replaced certificate files without a restart, and the caller's SPIFFE ID
read from its verified client certificate."""

from fedtoken.tls.credentials import ServerTls, channel_credentials, server_credentials
from fedtoken.tls.devca import DevPki, ensure_dev_pki, issue_client_cert
from fedtoken.tls.identity import spiffe_id_of

__all__ = ["DevPki", "ServerTls", "channel_credentials", "ensure_dev_pki", "issue_client_cert",
           "server_credentials", "spiffe_id_of"]
