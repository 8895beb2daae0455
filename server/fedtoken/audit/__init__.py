"""The audit trail writer: durable records, batched verdicts, a local spill for outages.

See ``fedtoken.audit.writer`` for the design (grouping, order, exactly-once
replay, queue bound) and ``fedtoken.audit.spill`` for the spill's format.
"""

from fedtoken.audit.spill import (
    SPILL_FORMAT_VERSION,
    SPILLED_AT_KEY,
    SpillCorrupt,
    SpillInUse,
    SpillLog,
    SpillRecord,
    decode_record,
    encode_record,
)
from fedtoken.audit.writer import (
    MAX_ITEM_CHARS,
    VERIFIED_EVENT,
    VERIFIED_FIELDS,
    AuditMode,
    AuditWriter,
    VerdictLike,
    clean_event,
)

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
]
