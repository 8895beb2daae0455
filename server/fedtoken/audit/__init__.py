"""The audit trail writer: durable records, batched verdicts, a local spill for outages.

See ``fedtoken.audit.writer`` for the design (modes, order, exactly-once,
queue bound), ``fedtoken.audit.mode`` for the direct/spill state machine
and the replay task, ``fedtoken.audit.rows`` for the grouping of verdicts,
``fedtoken.audit.replay`` for the replay, ``fedtoken.audit.appender`` for
the group commit of spill appends and ``fedtoken.audit.spill`` for the
spill's format.
"""

from fedtoken.audit.rows import (
    MAX_ITEM_CHARS,
    VERIFIED_EVENT,
    VERIFIED_FIELDS,
    VerdictLike,
    clean_event,
)
from fedtoken.audit.spill import (
    SPILL_FORMAT_VERSION,
    SPILLED_AT_KEY,
    SpillCorrupt,
    SpillInUse,
    SpillLog,
    SpillRecord,
    decode_record,
    encode_record,
    spill_dir_for,
)
from fedtoken.audit.writer import AuditMode, AuditWriter

__all__ = [
    "MAX_ITEM_CHARS",
    "SPILLED_AT_KEY",
    "SPILL_FORMAT_VERSION",
    "VERIFIED_EVENT",
    "VERIFIED_FIELDS",
    "AuditMode",
    "AuditWriter",
    "SpillCorrupt",
    "SpillInUse",
    "SpillLog",
    "SpillRecord",
    "VerdictLike",
    "clean_event",
    "decode_record",
    "encode_record",
    "spill_dir_for",
]
