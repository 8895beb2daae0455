"""One output path for every ``fedtoken`` command.

* stdout a terminal (and no ``--json``): tables, rendered with rich, for a
  person to read;
* ``--json``, or stdout not a terminal (a pipe, a file, a script): the JSON
  the commands always printed, unchanged (``json.dumps(..., indent=2,
  sort_keys=True)``), so scripts keep working;
* progress (a spinner on stderr) only when stderr is a terminal, never on a
  pipe;
* errors: one line on stderr, ``error: ...``, never a stack trace.

``configure`` sets the process's output once (``cli.main`` does, after
parsing); ``current`` returns it. Tests build their own ``Output`` with a
fixed-width console and compare the rendered string.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# A view: which columns a table shows, as (title, key) pairs; None: every key.
Columns = Sequence[tuple[str, str]]


def to_json(data: Any) -> str:
    """The JSON form of a command's result (the format scripts parse)."""
    return json.dumps(data, indent=2, sort_keys=True)


def cell(value: Any) -> str:
    """A value as one table cell: lists comma-separated, objects as compact
    JSON, booleans yes/no, nothing as '-'."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _lookup(row: Mapping[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def table(data: Any, columns: Columns | None = None, *, title: str = "") -> Table:
    """A rich table of a command's result: one row per item of a list, or
    FIELD / VALUE rows for a single object."""
    t = Table(box=box.SIMPLE_HEAD, title=title or None, title_justify="left",
              show_edge=False, pad_edge=False)
    if isinstance(data, Mapping) and columns is None:
        t.add_column("FIELD", style="bold")
        t.add_column("VALUE", overflow="fold")
        for key, value in data.items():
            t.add_row(key, cell(value))
        return t
    rows = list(data) if isinstance(data, list) else [data]
    if columns is None:
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        columns = [(k.upper(), k) for k in keys]
    for heading, _ in columns:
        t.add_column(heading, overflow="fold")
    for row in rows:
        t.add_row(*(cell(_lookup(row, key)) for _, key in columns))
    return t


@dataclass
class Output:
    """Where and how a command's results go (see the module doc)."""

    json: bool
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    width: int | None = None  # tests: a fixed width; None: the terminal's
    progress_enabled: bool = False

    @classmethod
    def detect(cls, *, json_flag: bool) -> Output:
        """JSON when asked or when stdout is not a terminal; progress only
        when stderr is a terminal."""
        tty = sys.stdout.isatty()
        return cls(json=json_flag or not tty, progress_enabled=sys.stderr.isatty())

    def console(self) -> Console:
        return Console(file=self.stdout, width=self.width, highlight=False,
                       soft_wrap=False, emoji=False, markup=False)

    def emit(self, data: Any, columns: Columns | None = None, *, title: str = "",
             empty: str = "(none)") -> None:
        """A command's result: JSON, or a table (``columns`` picks and
        orders them; ``title`` is a verdict line above it)."""
        if self.json:
            print(to_json(data), file=self.stdout, flush=True)
            return
        console = self.console()
        if title:
            console.print(Text(title, style="bold"))
        if isinstance(data, list) and not data:
            console.print(empty)
            return
        console.print(table(data, columns))

    def line(self, text: str) -> None:
        """Plain text on stdout, the same in both modes (e.g. a bare token)."""
        print(text, file=self.stdout, flush=True)

    def json_line(self, data: Any) -> None:
        """One JSON object on one line (streams such as ``audit tail``)."""
        print(json.dumps(data, sort_keys=True), file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """A remark for the person (stderr, never parsed)."""
        print(text, file=self.stderr, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, what: str) -> Iterator[None]:
        """A spinner saying ``what`` while a long operation runs (stderr a
        terminal only; nothing at all on a pipe)."""
        if not self.progress_enabled:
            yield
            return
        with Console(file=self.stderr, highlight=False).status(what):
            yield


_current = Output(json=True)


def configure(out: Output) -> Output:
    global _current
    _current = out
    return out


def current() -> Output:
    return _current
