"""The checkpoint journal on disk: the audit chain's signed checkpoints in a
file under the state directory, outside Postgres (the ``CheckpointJournal``
port of ``fedtoken.service.checkpoints``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fedtoken.audit.spill import fsync_dir
from fedtoken.core.checkpoint import MAX_LINE

if TYPE_CHECKING:
    from fedtoken.core.ports import CheckpointJournal

log = logging.getLogger(__name__)

CHECKPOINTS_FILE: Final = "checkpoints.jsonl"
KEY_FILE: Final = "checkpoint-key.jwk"


class FileCheckpointJournal:
    """Checkpoint lines in ``directory/checkpoints.jsonl`` (0644) and the key's
    public JWK in ``directory/checkpoint-key.jwk`` (0644); nothing in them is
    secret. Appends are one write each (O_APPEND) and fsync'ed with the
    directory, so processes sharing the directory never interleave a line."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / CHECKPOINTS_FILE
        self.key_path = directory / KEY_FILE

    @property
    def where(self) -> str:
        return str(self.path)

    async def last(self) -> str | None:
        return await asyncio.to_thread(self._last)

    async def append(self, line: str) -> None:
        await asyncio.to_thread(self._append, line)

    async def lines(self) -> list[str]:
        return await asyncio.to_thread(self._lines)

    def _lines(self) -> list[str]:
        """Every complete line (a torn last line is not one)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        data = data[: data.rfind(b"\n") + 1]
        return [line.decode("utf-8", "replace") for line in data.split(b"\n") if line.strip()]

    async def publish_key(self, jwk: dict[str, Any]) -> str:
        await asyncio.to_thread(self._publish_key, jwk)
        return str(self.key_path)

    def _mkdir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _last(self) -> str | None:
        """The last complete line. A torn last line (a crash mid-write, so
        never durable) is cut off, or it would make the file unverifiable."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            # A line is at most MAX_LINE + 1 bytes: a torn one and a whole one fit.
            start = max(0, size - 3 * (MAX_LINE + 1))
            f.seek(start)
            tail = f.read()
            end = tail.rfind(b"\n") + 1  # after the last complete line (0: none)
            if end < len(tail):
                log.warning("%s ends in a torn line (%d bytes); cutting it off", self.path,
                            len(tail) - end)
                f.truncate(start + end)
                os.fsync(f.fileno())
            lines = tail[:end].split(b"\n")
            if start:
                lines = lines[1:]  # the first may be the end of an earlier line
        whole = [line for line in lines if line.strip()]
        return whole[-1].decode("utf-8", "replace") if whole else None

    def _append(self, line: str) -> None:
        if "\n" in line:
            raise ValueError("a checkpoint line holds no newline")
        self._mkdir()
        data = (line + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.directory)

    def _publish_key(self, jwk: dict[str, Any]) -> None:
        self._mkdir()
        data = (json.dumps(jwk, indent=2, sort_keys=True) + "\n").encode("ascii")
        try:
            if self.key_path.read_bytes() == data:
                return
        except FileNotFoundError:
            pass
        tmp = self.key_path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.key_path)
        fsync_dir(self.directory)


if TYPE_CHECKING:

    def _implements(journal: FileCheckpointJournal) -> CheckpointJournal:
        return journal
