"""fedtoken: a federated JWT token authority (gRPC, PKCS#11 HSM, Postgres)."""

__version__ = "0.1.0"
