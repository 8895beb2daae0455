"""Where the server's time goes during a measured window: py-spy on one worker.

``python -m bench --profile DIR`` gives every server-side row's load a
``Profiler``: when the load generator reports that its measurement window
has begun, ``py-spy record`` is started against one worker of the server
(the first process listening on its gRPC port) for the window's length, in
non-blocking mode (the worker is not stopped for each sample). With
``--profile-native`` it records native frames too (C extension, OpenSSL,
gRPC core), which py-spy can only do by stopping the worker for every
sample. It writes, per row id:

* ``DIR/<id>.speedscope.json``: the flame graph (open it in speedscope);
* ``DIR/<id>.top.txt``: the top functions by self time (the leaf of each
  sample) and by inclusive time (anywhere on the stack), as shares of the
  samples of the worker's non-idle threads (``python -m bench.profile
  FILE.speedscope.json [N]`` prints it again from a saved profile).

Profiling costs the worker CPU (py-spy reads its memory ~100 times a second
per thread), so the rows of a profiled run are for locating time, not for
the table in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    """The py-spy executable (the venv's, then PATH's), or None."""
    here = Path(sys.executable).with_name("py-spy")
    if here.exists():
        return str(here)
    return shutil.which("py-spy")


def worker_pid(root_pid: int, port: int) -> int:
    """A process of ``root_pid``'s tree that listens on ``port`` (a worker
    of ``fedtoken serve --workers N``), or ``root_pid`` itself."""
    import psutil

    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return root_pid
    for proc in procs[1:] + procs[:1]:  # prefer a child: the supervisor does not serve
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return proc.pid
    return root_pid


@dataclass
class Profiler:
    """py-spy record of one process for one window, written as ``row_id``."""

    out_dir: Path
    row_id: str
    pid: int
    rate: int = 100
    native: bool = False
    top: int = 30
    _proc: subprocess.Popen[bytes] | None = None
    _seconds: float = 0.0

    @property
    def speedscope(self) -> Path:
        return self.out_dir / f"{self.row_id}.speedscope.json"

    @property
    def summary(self) -> Path:
        return self.out_dir / f"{self.row_id}.top.txt"

    def command(self, seconds: float) -> list[str]:
        exe = py_spy() or "py-spy"
        cmd = [exe, "record", "--pid", str(self.pid), "--duration", str(max(1, round(seconds))),
               "--rate", str(self.rate), "--format", "speedscope",
               "--output", str(self.speedscope)]
        # py-spy unwinds native stacks only with the process stopped.
        cmd.append("--native" if self.native else "--nonblocking")
        return cmd

    def start(self, seconds: float) -> None:
        """Called when the window begins (by bench.load.run_load)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if py_spy() is None:
            self.summary.write_text("py-spy is not installed (pip install py-spy)\n")
            return
        self._seconds = seconds
        log = self.out_dir / f"{self.row_id}.py-spy.log"
        with log.open("wb") as out:
            self._proc = subprocess.Popen(self.command(seconds), stdout=out,
                                          stderr=subprocess.STDOUT)

    def finish(self) -> None:
        """Wait for py-spy and write the summary (after the window ended)."""
        if self._proc is None:
            return
        try:
            self._proc.wait(self._seconds + 30)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            self._proc.wait(10)
        self._proc = None
        if not self.speedscope.exists():
            self.summary.write_text(f"py-spy wrote no profile; see {self.row_id}.py-spy.log\n")
            return
        data = json.loads(self.speedscope.read_text())
        self.summary.write_text(summarize(data, self.top, title=f"{self.row_id}: pid {self.pid}"))


def _frame_name(frame: dict[str, Any]) -> str:
    """A function (lines of one function are added up), or a library for
    native frames without a symbol."""
    name = str(frame.get("name", "?"))
    file = str(frame.get("file") or "")
    if file:
        short = "/".join(Path(file).parts[-2:])
        if name.startswith("0x"):  # no symbol: one entry per library
            return f"[native code in {short}]"
        return f"{name} ({short})"
    return name


def summarize(speedscope: dict[str, Any], top: int = 30, title: str = "") -> str:
    """Top frames by self and inclusive share of a speedscope "sampled" file
    as py-spy writes it (one profile per thread, stacks root first)."""
    frames = speedscope.get("shared", {}).get("frames", [])
    names = [_frame_name(f) for f in frames]
    self_w: Counter[str] = Counter()
    incl_w: Counter[str] = Counter()
    thread_w: Counter[str] = Counter()
    total = 0.0
    n_samples = 0
    for prof in speedscope.get("profiles", []):
        samples = prof.get("samples", [])
        weights = prof.get("weights") or [1.0] * len(samples)
        for stack, w in zip(samples, weights, strict=False):
            if not stack:
                continue
            total += w
            n_samples += 1
            thread_w[str(prof.get("name", "?"))] += w
            self_w[names[stack[-1]]] += w
            for name in {names[i] for i in stack}:
                incl_w[name] += w
    lines = [title or "py-spy profile",
             f"{n_samples} non-idle samples ({total:.2f} s of thread time); shares below are "
             "of these", ""]
    if not total:
        return "\n".join([*lines, "no samples"]) + "\n"

    def block(head: str, counter: Counter[str]) -> None:
        lines.append(head)
        for name, w in counter.most_common(top):
            lines.append(f"{100 * w / total:6.1f}%  {name}")
        lines.append("")

    block("by thread:", thread_w)
    block(f"top {top} by self time (leaf frame):", self_w)
    block(f"top {top} by inclusive time (on the stack):", incl_w)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m bench.profile FILE.speedscope.json [TOP]", file=sys.stderr)
        return 2
    top = int(args[1]) if len(args) > 1 else 30
    print(summarize(json.loads(Path(args[0]).read_text()), top, title=args[0]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
