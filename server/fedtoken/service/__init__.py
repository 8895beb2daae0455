"""The service layer: fedtoken's use cases, one module per family.

Each depends on the ports in ``fedtoken.core.ports`` only (never on grpc,
aiohttp, asyncpg or pkcs11); ``fedtoken.app`` builds the adapters and
injects them.

- ``catalog``: the one snapshot of tenants and keys;
- ``tokens``: issue, revoke, compromise, introspect;
- ``verification``: verify, verify_batch;
- ``keyadmin``: tenants, key lifecycle, audit reading;
- ``jobs``: bootstrap, purge, signed audit checkpoints (later: rotation);
- ``callers``: the zero-trust policy (grants) and the authorization decision;
- ``checkpoints``: signing the audit chain head with the HSM checkpoint key.
"""

from fedtoken.service.catalog import Catalog
from fedtoken.service.jobs import Jobs
from fedtoken.service.keyadmin import KeyAdmin, TenantDefaults
from fedtoken.service.tokens import Tokens
from fedtoken.service.verification import Verification

__all__ = ["Catalog", "Jobs", "KeyAdmin", "TenantDefaults", "Tokens", "Verification"]
