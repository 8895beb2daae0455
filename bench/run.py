"""``python -m bench``: one run, one token set, every figure with its baseline.

Steps: start an embedded Postgres and ``fedtoken serve --workers 2`` (fresh
state dir, so a fresh SoftHSM token), issue the token set through the Issue
RPC, measure the limits (openssl speed) and the peer (PyJWT), the engine in
this process, VerifyBatch and Verify over gRPC with 2 workers, restart the
service with 1 worker and measure again, measure an empty grpc.aio handler,
then print the markdown table.

The native fast path of the engine (fedtoken._native) is used when it is
built; the header line says whether it ran. With it on, the VerifyBatch rows
of 2 workers (batches >= 1000) and the in-process engine row are measured a
second time with it off, in the same run. ``BENCH_NATIVE=off`` turns it off
for the whole run (the service's import of it is blocked by a sitecustomize
the bench puts on the service's PYTHONPATH; fedtoken itself has no switch).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench import baselines
from bench.load import Load, LoadResult, batch_requests, issue_tokens, run_load
from bench.service import EmptyServer, Service, create_database, sync_channel

if TYPE_CHECKING:
    from fedtoken_client._pb.fedtoken.v1.token_service_pb2 import GetKeysResponse

AUDIENCE = "bench"
NATIVE_ENV = "BENCH_NATIVE"

# Put on the service's PYTHONPATH to make ``import fedtoken._native`` fail, so
# the service runs the pure Python path (the engine falls back on ImportError).
_BLOCK_NATIVE = """\
import sys


class _BlockNative:
    def find_spec(self, name, path=None, target=None):
        if name == "fedtoken._native":
            raise ImportError("fedtoken._native blocked by the bench")
        return None


sys.meta_path.insert(0, _BlockNative())
"""


def native_wanted() -> bool:
    return os.environ.get(NATIVE_ENV, "on").lower() not in ("0", "off", "no", "false")


def native_state() -> str:
    """What the header says about the native fast path."""
    from fedtoken.verifier.engine import NATIVE_AVAILABLE

    if not NATIVE_AVAILABLE:
        return "off (fedtoken._native not built)"
    return "on" if native_wanted() else f"off ({NATIVE_ENV}=off)"


@contextmanager
def native_blocked() -> Iterator[None]:
    """Services started inside this block cannot import fedtoken._native."""
    old = os.environ.get("PYTHONPATH")
    with tempfile.TemporaryDirectory(prefix="fedtoken-bench-nonative-") as tmp:
        Path(tmp, "sitecustomize.py").write_text(_BLOCK_NATIVE)
        os.environ["PYTHONPATH"] = tmp + (os.pathsep + old if old else "")
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old


@dataclass
class Row:
    figure: str
    value: float
    unit: str = "tokens/s"
    baseline: str = ""
    baseline_value: float = 0.0
    target: str = ""
    command: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline_value if self.baseline_value else None

    def verdict(self) -> str:
        if not self.target or self.ratio is None:
            return self.target
        ok = self.ratio >= float(self.target.split()[1].rstrip("x"))
        return f"{self.target} {'met' if ok else 'MISSED'}"


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    return (f"nproc {os.cpu_count()}, {cpu}, Python {platform.python_version()}, "
            f"{openssl} (Python ssl: {ssl.OPENSSL_VERSION}), {platform.platform()}")


def table(rows: Sequence[Row]) -> str:
    out = ["| figure | value | baseline (same run) | ratio | target | command |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        base = f"{r.baseline}: {_fmt(r.baseline_value)}" if r.baseline else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        out.append(f"| {r.figure} | {_fmt(r.value)} {r.unit} | {base} | {ratio} | "
                   f"{r.verdict()} | `{r.command}` |")
    return "\n".join(out)


def engine_rate(tokens: Sequence[str], resp: GetKeysResponse, batch: int,
                seconds: float, native: bool | None = None) -> float:
    """The engine alone in this process (no gRPC, no audit), default threads."""
    from fedtoken.config import Settings
    from fedtoken.core.model import Expectation, KeyRecord, KeyState, Tenant
    from fedtoken.core.ports import SystemClock
    from fedtoken.revocation.view import InMemoryRevocationView
    from fedtoken.verifier import LocalKeyResolver, VerificationEngine

    records = [KeyRecord(kid=k.kid, tenant=k.tenant, alg=k.alg, key_size=k.key_size,
                         state=KeyState.ACTIVE, public_jwk=json.loads(k.public_jwk_json),
                         hsm_label="") for k in resp.keys]
    resolver = LocalKeyResolver()
    resolver.replace([Tenant(resp.tenant, resp.issuer)], records)
    view = InMemoryRevocationView(staleness=3600)
    view.confirm_fresh(time.monotonic())
    engine = VerificationEngine(resolver, view, clock=SystemClock(),
                                threads=Settings().verify_threads, native=native)
    expect = Expectation(audience=AUDIENCE)
    chunks = [tokens[i : i + batch] for i in range(0, len(tokens), batch)]

    async def go() -> float:
        first = await engine.verify_batch(chunks[0], expect)
        bad = [v.reason for v in first if not v.valid]
        if bad:
            raise RuntimeError(f"engine rejected bench tokens: {bad[:3]}")
        done, i = 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            verdicts = await engine.verify_batch(chunks[i % len(chunks)], expect)
            done += len(verdicts)
            i += 1
        return done / (time.perf_counter() - start)

    try:
        return asyncio.run(go())
    finally:
        engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about a minute: fewer tokens")
    p.add_argument("--tokens", type=int, help="distinct tokens (default 20000, quick 5000)")
    p.add_argument("--seconds", type=float, help="measured seconds per row (default 4, quick 1.5)")
    p.add_argument("--batches", default="1,100,1000,5000", help="VerifyBatch sizes")
    p.add_argument("--dsn", help="admin DSN of a Postgres to use instead of an embedded one")
    p.add_argument("--markdown", type=Path, help="also write the table and machine to this file")
    args = p.parse_args(argv)
    n_tokens = args.tokens or (5000 if args.quick else 20000)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    warmup = 0.5 if args.quick else 1.0
    ossl_seconds = 1 if args.quick else 3
    batches = [int(b) for b in args.batches.split(",")]
    cmdline = "python -m bench" + (" --quick" if args.quick else "")

    def say(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fedtoken-bench-") as tmp:
        state = Path(tmp)
        pg = None
        admin = args.dsn
        if admin is None:
            from fedtoken.store.embedded import EmbeddedPostgres

            say("starting embedded Postgres")
            pg = EmbeddedPostgres(state / "pg")
            admin = pg.start()
        service = Service(state / "svc", create_database(admin))
        service.state.mkdir()
        # A second, independent instance whose tokens the service trusts
        # (its own SoftHSM token, PKI and database): the foreign-token row.
        partner = Service(state / "partner", create_database(admin), name="partner")
        partner.state.mkdir()
        empty = EmptyServer(state, pki=state / "svc" / "tls")
        try:
            rows = _measure(service, empty, n_tokens, seconds, warmup, ossl_seconds, batches,
                            cmdline, say, partner)
        finally:
            service.stop()
            partner.stop()
            empty.stop()
            if pg is not None:
                pg.stop()

    text = table(rows)
    header = (f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {machine()}; "
              f"{n_tokens} distinct tokens; {seconds:g} s per row after {warmup:g} s warm-up; "
              f"native fast path: {native_state()}")
    print(header + "\n\n" + text)
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + text + "\n")
    return 0


def _measure(service: Service, empty: EmptyServer, n_tokens: int, seconds: float, warmup: float,
             ossl_seconds: int, batches: Sequence[int], cmdline: str,
             log: Callable[[str], None], partner: Service | None = None) -> list[Row]:
    from fedtoken.verifier.engine import NATIVE_AVAILABLE

    native = NATIVE_AVAILABLE and native_wanted()
    log(f"native fast path: {native_state()}")
    if NATIVE_AVAILABLE and not native:
        with native_blocked():
            return _measure_rows(service, empty, n_tokens, seconds, warmup, ossl_seconds,
                                 batches, cmdline, log, native, partner)
    return _measure_rows(service, empty, n_tokens, seconds, warmup, ossl_seconds, batches,
                         cmdline, log, native, partner)


# The service under test trusts the partner's loopback http issuer.
FEDERATION_ENV = {"FEDTOKEN_FEDERATION_ALLOW_HTTP_LOOPBACK": "1"}


def _foreign_row(service: Service, partner: Service | None, n_tokens: int,
                 batches: Sequence[int], seconds: float, warmup: float,
                 log: Callable[[str], None]) -> tuple[int, LoadResult] | None:
    """VerifyBatch of the partner's tokens on the service (its default tenant
    trusts the partner), at the largest batch size, once the cache is warm."""
    sizes = [b for b in batches if b > 1]
    if partner is None or not sizes:
        return None
    size = max(sizes)
    log("partner instance: issuing its tokens; the service trusts it")
    partner.start(1)
    try:
        foreign = asyncio.run(issue_tokens(partner.target, n_tokens, AUDIENCE, tls=partner.tls))
        with service.client() as c:
            c.add_trusted_issuer(partner.issuer, tenants=["default"], max_stale_seconds=3600)
            deadline = time.monotonic() + 60
            while not all(i.key_set.usable for i in c.list_trusted_issuers()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the partner's key set never became usable")
                time.sleep(0.2)
        requests = batch_requests(foreign, size, AUDIENCE, tenant="default")
        log(f"VerifyBatch batch {size} of foreign tokens, 2 worker(s)")
        assert service.proc is not None
        res = run_load(Load(service.target, "VerifyBatch", requests, size, 4, 1, seconds,
                            warmup, server_pid=service.proc.pid, tls=service.tls))
        if res.errors or res.valid != res.tokens:
            raise RuntimeError(f"foreign VerifyBatch: {res.errors} errors, {res.valid} valid "
                               f"of {res.tokens}")
        return size, res
    finally:
        partner.stop()


def _measure_rows(service: Service, empty: EmptyServer, n_tokens: int, seconds: float,
                  warmup: float, ossl_seconds: int, batches: Sequence[int], cmdline: str,
                  log: Callable[[str], None], native: bool,
                  partner: Service | None = None) -> list[Row]:

    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2_grpc

    rows: list[Row] = []
    cores = os.cpu_count() or 1
    path = "native fast path" if native else "Python path"

    log("openssl speed rsa2048, 1 process and -multi 2")
    ossl1 = baselines.openssl_verify_rate(ossl_seconds, 1)
    ossl2 = baselines.openssl_verify_rate(ossl_seconds, 2)
    rows.append(Row("openssl speed RSA-2048 verify, 1 process", ossl1,
                    command=" ".join(baselines.openssl_command(ossl_seconds, 1))))
    rows.append(Row("openssl speed RSA-2048 verify, 2 processes (the limit)", ossl2,
                    baseline="1 process", baseline_value=ossl1,
                    command=" ".join(baselines.openssl_command(ossl_seconds, 2))))

    log("starting fedtoken serve --workers 2")
    service.start(2, env_extra=FEDERATION_ENV)
    t0 = time.perf_counter()
    tokens = asyncio.run(issue_tokens(service.target, n_tokens, AUDIENCE, tls=service.tls))
    log(f"issued {len(set(tokens))} distinct tokens in {time.perf_counter() - t0:.1f} s")
    with sync_channel(service.target, service.tls) as ch:
        keys = token_service_pb2_grpc.TokenServiceStub(ch).GetKeys(pb.GetKeysRequest())
    jwks = baselines.jwks_by_kid([k.public_jwk_json for k in keys.keys])

    log("PyJWT loop")
    pyjwt = baselines.pyjwt_rate(tokens, jwks, AUDIENCE, keys.issuer, seconds)
    rows.append(Row("PyJWT 2.x one-thread loop (kid lookup + jwt.decode aud/iss)", pyjwt,
                    baseline="openssl 2 processes", baseline_value=ossl2,
                    command=f"{cmdline}  # in-process"))
    log("engine in-process")
    eng = engine_rate(tokens, keys, 1000, seconds, native=native)
    rows.append(Row(f"engine.verify_batch in-process, batch 1000 (no gRPC, no audit), {path}",
                    eng, baseline="openssl 2 processes", baseline_value=ossl2,
                    command=f"{cmdline}  # in-process"))
    if native:
        log("engine in-process, native fast path off")
        eng_py = engine_rate(tokens, keys, 1000, seconds, native=False)
        rows.append(Row("engine.verify_batch in-process, batch 1000, Python path (native off)",
                        eng_py, baseline="native fast path", baseline_value=eng,
                        command=f"{NATIVE_ENV}=off {cmdline}  # in-process"))

    requests = {b: batch_requests(tokens, b, AUDIENCE) for b in batches}

    def grpc_rows(workers: int, sizes: Sequence[int] = batches) -> dict[int, LoadResult]:
        results: dict[int, LoadResult] = {}
        for b in sizes:
            method = "Verify" if b == 1 else "VerifyBatch"
            # Enough in flight to keep every worker busy, few enough that a
            # call's latency stays well under the measured window.
            in_flight = 8 if b == 1 else 2 if b <= 100 else 1
            conns = 8 * workers if b <= 1000 else 2 * workers
            log(f"{method} batch {b}, {workers} worker(s)")
            assert service.proc is not None
            res = run_load(Load(service.target, method, requests[b], b, conns,
                                in_flight, seconds, warmup, server_pid=service.proc.pid,
                                tls=service.tls))
            if res.errors or res.valid != res.tokens:
                raise RuntimeError(f"{method} batch {b}: {res.errors} errors, "
                                   f"{res.valid} valid of {res.tokens}")
            results[b] = res
        return results

    two = grpc_rows(2)
    foreign = _foreign_row(service, partner, n_tokens, batches, seconds, warmup, log)
    service.stop()
    # The same rows with the Python path, for the ratio in this run.
    python_two: dict[int, LoadResult] = {}
    if native and any(b >= 1000 for b in batches):
        log("restarting fedtoken serve --workers 2 without the native fast path")
        with native_blocked():
            service.start(2)
        python_two = grpc_rows(2, [b for b in batches if b >= 1000])
        service.stop()
    log("restarting fedtoken serve --workers 1")
    service.start(1)
    one = grpc_rows(1)
    service.stop()
    # What mTLS costs: the same rows with the service and the empty handler in
    # plaintext (insecure mode, every caller taken to be the dev operator).
    tls_sizes = [b for b in (1, 1000) if b in batches]
    plain_one: dict[int, LoadResult] = {}
    if tls_sizes:
        log("restarting fedtoken serve --workers 1 in plaintext (TLS cost)")
        service.start(1, insecure=True)
        plain_one = grpc_rows(1, tls_sizes)
        service.stop()

    def empty_load(insecure: bool) -> LoadResult:
        empty.start(insecure=insecure)
        assert empty.proc is not None
        res = run_load(Load(empty.target, "Verify", requests[1], 1, 8, 8, seconds, warmup,
                            count_valid=False, server_pid=empty.proc.pid, tls=empty.tls))
        empty.stop()
        return res

    if 1 in batches:
        log("empty grpc.aio unary handler over mTLS, then in plaintext")
        empty_res = empty_load(insecure=False)
        empty_rate = empty_res.calls_per_s
        empty_plain = empty_load(insecure=True)

    serve_cmd = "fedtoken serve --workers {w}; " + cmdline
    for workers, results in ((2, two), (1, one)):
        for b in batches:
            if b == 1:
                continue
            rows.append(Row(
                f"VerifyBatch via gRPC, batch {b}, {workers} worker(s), default config, {path}",
                results[b].tokens_per_s, baseline="openssl 2 processes", baseline_value=ossl2,
                target=">= 0.75x (stretch 0.85x)" if workers == cores else "",
                command=serve_cmd.format(w=workers)))
    for b, res in python_two.items():
        rows.append(Row(
            f"VerifyBatch via gRPC, batch {b}, 2 worker(s), Python path (native off)",
            res.tokens_per_s, baseline="same with native fast path",
            baseline_value=two[b].tokens_per_s,
            command=f"{NATIVE_ENV}=off " + serve_cmd.format(w=2)))
    if foreign is not None:
        fb, res = foreign
        rows.append(Row(
            f"VerifyBatch via gRPC, batch {fb}, 2 worker(s), FOREIGN tokens (trusted issuer, "
            f"cache warm), {path}", res.tokens_per_s,
            baseline="the same with local tokens", baseline_value=two[fb].tokens_per_s,
            target=">= 0.9x (within noise of local)", command=serve_cmd.format(w=2)))
    best_b = max((b for b in batches if b > 1), key=lambda b: two[b].tokens_per_s, default=None)
    if best_b is not None:
        rows.append(Row(f"VerifyBatch batch {best_b}, 2 workers, vs PyJWT loop",
                        two[best_b].tokens_per_s, baseline="PyJWT loop", baseline_value=pyjwt,
                        target=">= 6x", command=serve_cmd.format(w=2)))
    if 1 in batches:
        rows.append(Row("empty grpc.aio unary handler, 1 process, mTLS", empty_rate,
                        unit="calls/s", command=f"{cmdline}  # 8 connections x 8 in flight"))
        rows.append(Row("unary Verify, 1 worker", one[1].calls_per_s, unit="calls/s",
                        baseline="empty handler", baseline_value=empty_rate, target=">= 0.8x",
                        command=serve_cmd.format(w=1)))
        rows.append(Row("unary Verify, 2 workers", two[1].calls_per_s, unit="calls/s",
                        baseline="unary Verify, 1 worker", baseline_value=one[1].calls_per_s,
                        command=serve_cmd.format(w=2) + "  # 16 connections x 8 in flight"))
        # The load generator is Python too and shares the cores, so the rates
        # above are partly client-bound; per second of server CPU they are not.
        rows.append(Row("empty handler, calls per server CPU-second", empty_res.calls_per_cpu_s,
                        unit="calls/CPU-s", command=f"{cmdline}  # psutil CPU time of server"))
        rows.append(Row("unary Verify, 1 worker, calls per server CPU-second",
                        one[1].calls_per_cpu_s, unit="calls/CPU-s", baseline="empty handler",
                        baseline_value=empty_res.calls_per_cpu_s, target=">= 0.8x",
                        command=serve_cmd.format(w=1)))
        rows.append(Row("unary Verify, 2 workers, calls per server CPU-second",
                        two[1].calls_per_cpu_s, unit="calls/CPU-s",
                        baseline="1 worker", baseline_value=one[1].calls_per_cpu_s,
                        command=serve_cmd.format(w=2)))
        # The TLS cost: each plaintext figure against its mTLS twin.
        rows.append(Row("empty handler in plaintext (mTLS off)", empty_plain.calls_per_s,
                        unit="calls/s", baseline="empty handler over mTLS",
                        baseline_value=empty_rate, command=f"{cmdline}  # plaintext"))
        if 1 in plain_one:
            rows.append(Row("unary Verify, 1 worker, plaintext (mTLS off)",
                            plain_one[1].calls_per_s, unit="calls/s",
                            baseline="the same over mTLS", baseline_value=one[1].calls_per_s,
                            command="FEDTOKEN_INSECURE=1 " + serve_cmd.format(w=1)))
    if 1000 in plain_one:
        rows.append(Row("VerifyBatch batch 1000, 1 worker, plaintext (mTLS off)",
                        plain_one[1000].tokens_per_s, baseline="the same over mTLS",
                        baseline_value=one[1000].tokens_per_s,
                        command="FEDTOKEN_INSECURE=1 " + serve_cmd.format(w=1)))
    return rows
