"""The durable local spill of the audit trail, for while Postgres is away.

Layout of a spill directory (mode 0700, files 0600), owned by one process at
a time (``flock`` on ``.lock``)::

    seg-000000000001.jsonl   spilled events, one JSON line each, in order
    seg-000000000001.ack     replay progress of that segment (see below)
    corrupt/                 torn or unreadable lines, kept byte for byte
    rejected.jsonl           events Postgres refused outright (never silently dropped)

A segment line is ``{"v": 1, "at": <unix seconds>, "e": {<AuditEvent>}}``,
plus ``"maybe_seq": N`` when the event may already be in Postgres at seq N
(its commit failed with the outcome unknown). Appends are written and
fsync'ed before they are acknowledged; a new segment's directory entry is
fsync'ed too. Segments are only ever appended to by the process that
created them in this run; after a restart every existing segment is closed
and new events go to a new segment, so a torn last line (a crash in the
middle of a write) stays the last line of its segment. Reading a segment
copies such a line, and any line that does not parse, to ``corrupt/`` and
skips it; it is never silently dropped.

Replay progress (``.ack``, JSON lines, appended and fsync'ed):

- ``{"pending": [start, end, seq, line]}`` written inside the Postgres
  transaction that appends lines ``start..end-1``, just before COMMIT: if
  it committed, the event of line ``line`` is the row with seq ``seq``;
- ``{"done": end}`` written after the commit (or once a pending entry is
  resolved): lines before ``end`` are in Postgres.

So after a crash at any point the replay knows exactly which lines are in
Postgres: a trailing pending entry is settled by comparing the row at its seq
with its line's event (rows are immutable and seqs gapless, so that row is
ours exactly when the commit happened). A torn trailing ack line can only be
a pending entry whose fsync did not finish, so its transaction never
committed. Replay is exactly-once, without a de-duplication table.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from fedtoken.core.audit import AuditEvent

log = logging.getLogger(__name__)

SPILL_FORMAT_VERSION: Final = 1
"""Version of a segment line (``"v"``)."""

SPILLED_AT_KEY: Final = "spilled_at"
"""Key added to ``details`` of a replayed event: when it was spilled (unix seconds).

A replayed row's ``ts`` is the time of the replay; this is when it happened.
"""

DEFAULT_MAX_SEGMENT_BYTES: Final = 64 * 1024 * 1024

_SEGMENT_NAME = re.compile(r"^seg-(\d{12})\.jsonl$")
_EVENT_FIELDS: Final = (
    "event_type",
    "tenant",
    "actor",
    "subject",
    "jti",
    "kid",
    "outcome",
    "reason",
    "request_id",
)


class SpillCorrupt(ValueError):
    """A spill line that cannot be decoded."""


class SpillInUse(OSError):
    """Another live process holds this spill directory."""


@dataclass(frozen=True, slots=True)
class SpillRecord:
    """One spilled event."""

    event: AuditEvent
    spilled_at: float
    maybe_seq: int = 0
    """>0: the event may already be in Postgres at this seq (commit outcome unknown)."""

    def replay_event(self) -> AuditEvent:
        """The event as replayed: ``details`` gains ``spilled_at``."""
        details = dict(self.event.details or {})
        details[SPILLED_AT_KEY] = self.spilled_at
        return replace(self.event, details=details)


def encode_record(record: SpillRecord) -> bytes:
    """One segment line, newline included."""
    e = record.event
    obj: dict[str, Any] = {
        "v": SPILL_FORMAT_VERSION,
        "at": record.spilled_at,
        "e": {name: getattr(e, name) for name in _EVENT_FIELDS if getattr(e, name)},
    }
    if e.details is not None:
        obj["e"]["details"] = e.details
    if record.maybe_seq:
        obj["maybe_seq"] = record.maybe_seq
    # ASCII-only output: whatever the strings hold, the line is valid UTF-8.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def decode_record(line: bytes) -> SpillRecord:
    """Parse one segment line (without its newline); SpillCorrupt if it is not one."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise SpillCorrupt("not JSON") from exc
    if not isinstance(obj, dict) or obj.get("v") != SPILL_FORMAT_VERSION:
        raise SpillCorrupt("unknown line format")
    raw, at, maybe = obj.get("e"), obj.get("at"), obj.get("maybe_seq", 0)
    if not isinstance(raw, dict) or not isinstance(at, int | float) or type(maybe) is not int:
        raise SpillCorrupt("malformed record")
    values: dict[str, Any] = {}
    for name in _EVENT_FIELDS:
        value = raw.get(name, "")
        if not isinstance(value, str):
            raise SpillCorrupt(f"{name} is not a string")
        values[name] = value
    details = raw.get("details")
    if details is not None and not isinstance(details, dict):
        raise SpillCorrupt("details is not an object")
    if not values["event_type"]:
        raise SpillCorrupt("event without event_type")
    return SpillRecord(AuditEvent(details=details, **values), float(at), maybe)


@dataclass(frozen=True, slots=True)
class SegmentContents:
    """A closed segment as read back."""

    records: list[tuple[int, SpillRecord]]
    """(line number from 0, record) of every good line, in order."""
    lines: int
    """Lines in the file, bad ones and a torn last one included."""
    bad_lines: int
    """Lines set aside under ``corrupt/``."""

    def record_at(self, line: int) -> SpillRecord | None:
        for number, record in self.records:
            if number == line:
                return record
        return None


@dataclass(frozen=True, slots=True)
class PendingReplay:
    start: int
    end: int
    seq: int
    line: int


@dataclass(frozen=True, slots=True)
class AckState:
    done: int = 0
    """Lines before this are in Postgres."""
    pending: PendingReplay | None = None
    """A replay transaction whose commit was not confirmed."""


@dataclass
class _Active:
    path: Path
    fd: int
    dev: int
    ino: int
    size: int = 0
    lines: int = 0


@dataclass
class SpillLog:
    """The spill directory of one process. Blocking file I/O: call from a thread.

    Appends to the active segment and the replay's reads of closed segments
    touch different files and may run in two threads at once; appends (and
    ``rotate``) must be serialised by the caller.
    """

    directory: Path
    max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES
    _lock_fd: int | None = field(default=None, init=False)
    _active: _Active | None = field(default=None, init=False)
    _closed: list[Path] = field(default_factory=list, init=False)
    _next: int = field(default=1, init=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False)

    # --- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Create (0700) and lock the directory; every existing segment is backlog."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise SpillInUse(
                errno.EBUSY, f"audit spill directory {self.directory} is used by another process"
            ) from exc
        self._lock_fd = fd
        numbers = []
        for entry in self.directory.iterdir():
            match = _SEGMENT_NAME.match(entry.name)
            if match:
                numbers.append(int(match.group(1)))
        numbers.sort()
        with self._mutex:
            self._closed = [self._segment_path(n) for n in numbers]
            self._next = (numbers[-1] + 1) if numbers else 1
        # Progress files whose segment was removed (crash between the two unlinks).
        for ack in self.directory.glob("seg-*.ack"):
            if not ack.with_suffix(".jsonl").exists():
                ack.unlink(missing_ok=True)
        if numbers:
            log.warning("audit spill %s holds %d unreplayed segment(s)", self.directory,
                        len(numbers))

    def close(self) -> None:
        """Close the active segment and release the directory."""
        self.rotate()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- appending --------------------------------------------------------------

    @property
    def active_lines(self) -> int:
        active = self._active
        return active.lines if active is not None else 0

    def append(self, lines: Sequence[bytes]) -> None:
        """Append complete lines to the active segment and fsync; OSError if not durable.

        On failure the segment is cut back to its last good length; if even
        that fails it is abandoned (closed; its torn tail is set aside when it
        is replayed) and the next append starts a new segment.
        """
        if not lines:
            return
        if self._lock_fd is None:
            raise OSError(errno.EBADF, "audit spill is not open")
        active = self._active
        if active is not None and active.size >= self.max_segment_bytes:
            self.rotate()
            active = None
        if active is None:
            active = self._open_segment()
        else:
            self._check_still_linked(active)
        data = b"".join(lines)
        try:
            _write_all(active.fd, data)
            os.fsync(active.fd)
        except OSError:
            try:
                os.ftruncate(active.fd, active.size)
                os.fsync(active.fd)
            except OSError:
                log.error("audit spill segment %s abandoned after a failed write", active.path)
                self._abandon()
            raise
        active.size += len(data)
        active.lines += len(lines)

    def rotate(self) -> None:
        """Close the active segment: it joins the backlog (an empty one is removed)."""
        active = self._active
        if active is None:
            return
        self._active = None
        with contextlib.suppress(OSError):
            os.close(active.fd)
        if active.lines == 0 and active.size == 0:
            with contextlib.suppress(OSError):
                active.path.unlink()
            return
        with self._mutex:
            self._closed.append(active.path)

    def _open_segment(self) -> _Active:
        with self._mutex:
            number = self._next
            self._next += 1
        path = self._segment_path(number)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            fsync_dir(self.directory)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._active = _Active(path, fd, st.st_dev, st.st_ino)
        return self._active

    def _check_still_linked(self, active: _Active) -> None:
        """The directory may have been removed or replaced since the segment was opened."""
        try:
            st = os.stat(active.path)
        except OSError:
            self._abandon()
            raise
        if (st.st_dev, st.st_ino) != (active.dev, active.ino):
            self._abandon()
            raise OSError(errno.ESTALE, f"audit spill segment {active.path} was replaced")

    def _abandon(self) -> None:
        active = self._active
        self._active = None
        if active is None:
            return
        with contextlib.suppress(OSError):
            os.close(active.fd)
        if active.path.exists():
            with self._mutex:
                self._closed.append(active.path)

    # --- the backlog --------------------------------------------------------------

    def backlog(self) -> list[Path]:
        """Closed segments not yet fully replayed, oldest first."""
        with self._mutex:
            return list(self._closed)

    def has_backlog(self) -> bool:
        with self._mutex:
            return bool(self._closed) or self.active_lines > 0

    def read_segment(self, path: Path) -> SegmentContents:
        """Decode a closed segment; bad and torn lines are copied to ``corrupt/``."""
        data = path.read_bytes()
        pieces = data.split(b"\n")
        tail = pieces.pop()  # b"" when the file ends with a newline
        records: list[tuple[int, SpillRecord]] = []
        bad: list[tuple[int, bytes, str]] = []
        for number, raw in enumerate(pieces):
            try:
                records.append((number, decode_record(raw)))
            except SpillCorrupt as exc:
                bad.append((number, raw, str(exc)))
        lines = len(pieces)
        if tail:
            bad.append((lines, tail, "torn last line (no newline)"))
            lines += 1
        for number, raw, why in bad:
            self._set_aside(path, number, raw, why)
        return SegmentContents(records, lines, len(bad))

    def _set_aside(self, segment: Path, line: int, raw: bytes, why: str) -> None:
        folder = self.directory / "corrupt"
        folder.mkdir(mode=0o700, exist_ok=True)
        target = folder / f"{segment.stem}.line{line}.bad"
        _write_durably(target, raw)
        log.error("audit spill %s line %d unreadable (%s); kept as %s", segment.name, line,
                  why, target)

    def read_ack(self, segment: Path) -> AckState:
        ack = segment.with_suffix(".ack")
        try:
            data = ack.read_bytes()
        except FileNotFoundError:
            return AckState()
        done, pending = 0, None
        for raw in data.split(b"\n"):
            try:
                entry = json.loads(raw)
            except ValueError:
                continue  # torn: a pending entry that never reached the disk, or empty
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("done"), int):
                done, pending = entry["done"], None
            elif isinstance(entry.get("pending"), list) and len(entry["pending"]) == 4:
                pending = PendingReplay(*(int(x) for x in entry["pending"]))
        return AckState(done, pending)

    def mark_pending(self, segment: Path, start: int, end: int, seq: int, line: int) -> None:
        self._append_ack(segment, {"pending": [start, end, seq, line]})

    def mark_done(self, segment: Path, end: int) -> None:
        self._append_ack(segment, {"done": end})

    def _append_ack(self, segment: Path, entry: dict[str, Any]) -> None:
        ack = segment.with_suffix(".ack")
        fd = os.open(ack, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, json.dumps(entry, separators=(",", ":")).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_segment(self, segment: Path) -> None:
        """Forget a replayed segment: the segment goes first, then its progress file."""
        segment.unlink(missing_ok=True)
        fsync_dir(self.directory)
        segment.with_suffix(".ack").unlink(missing_ok=True)
        with self._mutex:
            if segment in self._closed:
                self._closed.remove(segment)

    def reject(self, records: Iterable[SpillRecord], why: str) -> None:
        """Keep events that Postgres refused outright in ``rejected.jsonl``."""
        data = b"".join(encode_record(r) for r in records)
        fd = os.open(self.directory / "rejected.jsonl",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.error("audit events refused by Postgres (%s) kept in %s", why,
                  self.directory / "rejected.jsonl")

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"seg-{number:012d}.jsonl"


def spill_dir_for(state_dir: Path, grpc_port: int, worker: int) -> Path:
    """The spill directory of one process identity (gRPC port and worker index),
    so that a restarted process replays what its predecessor could not write."""
    return state_dir / "audit-spill" / f"{grpc_port}-w{worker}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a new, renamed or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


__all__ = [
    "DEFAULT_MAX_SEGMENT_BYTES",
    "SPILLED_AT_KEY",
    "SPILL_FORMAT_VERSION",
    "AckState",
    "PendingReplay",
    "SegmentContents",
    "SpillCorrupt",
    "SpillInUse",
    "SpillLog",
    "SpillRecord",
    "decode_record",
    "encode_record",
    "spill_dir_for",
]
