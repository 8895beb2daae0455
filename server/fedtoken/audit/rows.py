"""Audit rows from queued verdicts and events, and sanitising of untrusted strings.

**Grouping.** One row per token would cost the verify path more than the
verification itself, so one ``token.verified`` row covers every verdict of
one flush window for one (tenant, actor), at most ``max_items_per_row`` of
them. Its ``details`` hold ``fields`` (the names below), ``items`` (one
compact entry per token: jti, subject, kid, "valid"/"invalid", reason,
request id, unix time in ms precision), and the counts ``count``, ``valid``,
``invalid``; ``outcome`` is "valid", "invalid" or "mixed", and
``request_id`` is set when all items share one. Every token's context is
in the row and so covered by the chain hash. Strings from tokens are
sanitised (NUL and lone surrogates become U+FFFD, which Postgres would
refuse) and capped at ``MAX_ITEM_CHARS``.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

from fedtoken.core.audit import AuditEvent

log = logging.getLogger(__name__)

VERIFIED_EVENT: Final = "token.verified"
VERIFIED_FIELDS: Final = ("jti", "sub", "kid", "outcome", "reason", "request_id", "time")
"""Meaning of the positions of each entry of a ``token.verified`` row's ``items``."""
MAX_ITEM_CHARS: Final = 1024

_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
_BAD_JSON = re.compile(r"[\ud800-\udfff]|\\u0000")


class VerdictLike(Protocol):
    """What the writer reads of a verdict (``fedtoken.core.model.Verdict`` is one)."""

    @property
    def valid(self) -> bool: ...
    @property
    def reason(self) -> enum.Enum | str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def jti(self) -> str: ...
    @property
    def kid(self) -> str: ...


VerifyEntry = tuple[str, str, str, float, Sequence[VerdictLike]]


@dataclass(frozen=True, slots=True)
class Entries:
    """Verification entries already in the row format (``VERIFIED_FIELDS``,
    every string clean), for one tenant and actor: what the native pipeline
    writes, so the writer does per-batch work only."""

    tenant: str
    actor: str
    items: list[list[Any]]


@dataclass(slots=True)
class Row:
    """A row built by the writer task, not yet durable; ``items`` is how many
    queued items (tokens, events) it stands for."""

    event: AuditEvent
    items: int
    maybe_seq: int = 0


@dataclass(slots=True)
class Group:
    tenant: str
    actor: str
    entries: list[list[Any]] = field(default_factory=list)

    def row(self) -> Row:
        entries = self.entries
        count = len(entries)
        valid = sum(1 for e in entries if e[3] == "valid")
        first_request = entries[0][5]
        same_request = all(e[5] == first_request for e in entries)
        event = AuditEvent(
            event_type=VERIFIED_EVENT,
            tenant=self.tenant,
            actor=self.actor,
            outcome="valid" if valid == count else "invalid" if valid == 0 else "mixed",
            request_id=first_request if same_request else "",
            details={
                "fields": list(VERIFIED_FIELDS),
                "items": entries,
                "count": count,
                "valid": valid,
                "invalid": count - valid,
            },
        )
        return Row(event, count)


def build_rows(entries: Iterable[VerifyEntry | Entries | AuditEvent], max_items: int
               ) -> list[Row]:
    """The rows for queued entries, in order: an event is a row of its own;
    verdicts join the open group of their (tenant, actor), at most
    ``max_items`` per row."""
    out: list[Row | Group] = []
    groups: dict[tuple[str, str], Group] = {}
    for entry in entries:
        if isinstance(entry, AuditEvent):
            out.append(Row(clean_event(entry), 1))
            continue
        if isinstance(entry, Entries):
            _add_entries(entry, groups, out, max_items)
            continue
        tenant, actor, request_id, at, verdicts = entry
        added = 0
        try:
            request_id = _clean(request_id)
            at = round(at, 3)
            for v in verdicts:
                key = (v.tenant or tenant, actor)
                group = groups.get(key)
                if group is None or len(group.entries) >= max_items:
                    group = groups[key] = Group(_clean(key[0]), _clean(actor))
                    out.append(group)
                reason = v.reason
                group.entries.append([
                    _clean(v.jti),
                    _clean(v.subject),
                    _clean(v.kid),
                    "valid" if v.valid else "invalid",
                    reason if isinstance(reason, str) else str(reason.value),
                    request_id,
                    at,
                ])
                added += 1
        except Exception as exc:  # a bad verdict must not stop the writer
            # Not silent: the trail says how many verdicts of which call it
            # could not describe.
            log.exception("audit writer: unreadable verdicts")
            missing = len(verdicts) - added
            out.append(Row(clean_event(AuditEvent(
                event_type="audit.unrecordable", tenant=tenant, actor=actor,
                request_id=request_id, outcome="error",
                details={"error": type(exc).__name__, "lost_items": missing},
            )), missing))
    return [g.row() if isinstance(g, Group) else g for g in out]


def _add_entries(entry: Entries, groups: dict[tuple[str, str], Group], out: list[Row | Group],
                 max_items: int) -> None:
    key = (entry.tenant, entry.actor)
    items, start = entry.items, 0
    while start < len(items):
        group = groups.get(key)
        if group is None or len(group.entries) >= max_items:
            group = groups[key] = Group(_clean(key[0]), _clean(key[1]))
            out.append(group)
        room = max_items - len(group.entries)
        group.entries.extend(items[start:start + room])
        start += room


# --- sanitising ------------------------------------------------------------------------


def _clean(value: str) -> str:
    """A string Postgres accepts, bounded (for strings taken from tokens)."""
    if len(value) <= MAX_ITEM_CHARS and value.isascii() and "\x00" not in value:
        return value
    value = _BAD_CHARS.sub("\ufffd", value)
    if len(value) > MAX_ITEM_CHARS:
        value = f"{value[:MAX_ITEM_CHARS]}...[{len(value)} chars]"
    return value


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _BAD_CHARS.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_BAD_CHARS.sub("\ufffd", str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_json(v) for v in value]
    return value


def clean_event(event: AuditEvent) -> AuditEvent:
    """The event with what Postgres would refuse replaced (NUL, lone surrogates,
    details that are not JSON), so that a hostile string can never block the trail."""
    changes: dict[str, Any] = {}
    for name in ("event_type", "tenant", "actor", "subject", "jti", "kid", "outcome", "reason",
                 "request_id"):
        value = getattr(event, name)
        if _BAD_CHARS.search(value):
            changes[name] = _BAD_CHARS.sub("\ufffd", value)
    if event.details is not None:
        try:
            text = json.dumps(event.details, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):
            changes["details"] = {"unserialisable_details": _clean(repr(event.details))}
        else:
            if _BAD_JSON.search(text):
                changes["details"] = _clean_json(event.details)
    return replace(event, **changes) if changes else event


__all__ = [
    "MAX_ITEM_CHARS",
    "VERIFIED_EVENT",
    "VERIFIED_FIELDS",
    "Entries",
    "Group",
    "Row",
    "VerdictLike",
    "VerifyEntry",
    "build_rows",
    "clean_event",
]
