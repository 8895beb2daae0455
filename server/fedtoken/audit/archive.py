"""Audit archives on disk: gzip'ed JSON lines under ``<state>/audit/archive``
(format: ``fedtoken.core.archive``), the ``AuditArchive`` port of
``fedtoken.service.retention``.

An archive is written to a temporary name, fsync'ed, renamed into place and
the directory fsync'ed, so it is either complete and durable or absent: the
retention job removes rows from Postgres only after ``write`` returned.
"""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fedtoken.audit.spill import fsync_dir
from fedtoken.core.archive import parse_archive_name, row_line
from fedtoken.core.audit import ArchivedRow

if TYPE_CHECKING:
    from fedtoken.core.ports import AuditArchive


class FileAuditArchive:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def where(self) -> str:
        return str(self.directory)

    async def write(self, name: str, header: str,
                    rows: AsyncIterator[list[ArchivedRow]]) -> str:
        if "/" in name or name.startswith("."):
            raise ValueError(f"not a plain file name: {name!r}")
        final = self.directory / name
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        out = await asyncio.to_thread(self._open, tmp)
        try:
            await asyncio.to_thread(out.write, (header + "\n").encode("utf-8"))
            async for page in rows:
                data = "".join(row_line(r) + "\n" for r in page).encode("utf-8")
                await asyncio.to_thread(out.write, data)
            await asyncio.to_thread(self._close, out)
        except BaseException:
            await asyncio.to_thread(_close_quietly, out)
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        await asyncio.to_thread(fsync_dir, self.directory)
        return str(final)

    def _open(self, tmp: Path) -> _Sink:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        raw = os.fdopen(fd, "wb")
        return _Sink(raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0))

    async def discard_after(self, seq: int) -> list[str]:
        return await asyncio.to_thread(self._discard_after, seq)

    def _discard_after(self, seq: int) -> list[str]:
        removed: list[str] = []
        if not self.directory.is_dir():
            return removed
        for path in sorted(self.directory.glob("audit-*.jsonl.gz")):
            first = parse_archive_name(path.name)
            if first is not None and first[0] > seq:
                path.unlink()
                removed.append(path.name)
        if removed:
            fsync_dir(self.directory)
        return removed

    @staticmethod
    def _close(out: _Sink) -> None:
        out.gz.close()  # writes the gzip trailer; leaves raw open
        out.raw.flush()
        os.fsync(out.raw.fileno())
        out.raw.close()


class _Sink:
    def __init__(self, raw: BinaryIO, gz: gzip.GzipFile) -> None:
        self.raw, self.gz = raw, gz

    def write(self, data: bytes) -> None:
        self.gz.write(data)


def _close_quietly(out: _Sink) -> None:
    try:
        out.gz.close()
    except OSError:
        pass
    out.raw.close()


def read_archive_lines(path: Path) -> list[str]:
    """The lines of an archive file (for ``fedtoken audit verify-archive``)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


if TYPE_CHECKING:

    def _implements(archive: FileAuditArchive) -> AuditArchive:
        return archive
