"""``python -m bench``: one run, one token set, every figure with its baseline.

Steps: openssl speed (1 process and -multi 2) and the in-process limits
(bench.mbrsa: crypto_mb vs OpenSSL, a process of its own); start an embedded
Postgres and ``fedtoken serve --workers 2`` (fresh state dir, so a fresh
SoftHSM token), issue the token set through the Issue RPC; the raw C_Sign
rate of one process on the service's own token and key (bench.hsmraw); the
peer (PyJWT) and the engine in this process; VerifyBatch and Verify over gRPC
with 2 workers, repeated tokens (the verified-token cache), Issue and
IssueBatch, foreign tokens; restart with FEDTOKEN_MULTIBUFFER=off (the
fallback row), without the native fast path, with 1 worker and in plaintext;
an empty grpc.aio handler; then revocation propagation and memory
(bench.revocation). Prints one markdown table with a stable id per row;
``--json FILE`` writes the same rows by id with a header object (date, CPU,
avx512ifma, cores, OpenSSL, multi-buffer status, native fast path).

Every load comes from a separate process replaying pre-encoded requests
(bench.load), and the server's CPU time (utime+stime of its whole process
tree) is read per window, so the ``*_cpu_ratio`` rows are per second of
server CPU. ``--profile DIR`` runs py-spy on one worker during every
server-side window (bench.profile).

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
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench import baselines, revocation
from bench.load import (
    Load,
    LoadResult,
    batch_requests,
    issue_batch_available,
    issue_batch_requests,
    issue_requests,
    issue_tokens,
    repeated_batch_requests,
    run_load,
)
from bench.profile import Profiler, py_spy, worker_pid
from bench.report import Row, check_ids, header, header_line, multibuffer_status, table, write_json
from bench.service import EmptyServer, Service, child_env, create_database, sync_channel

if TYPE_CHECKING:
    from fedtoken_client._pb.fedtoken.v1.token_service_pb2 import GetKeysResponse

AUDIENCE = "bench"
LABEL_PREFIX = "fedtoken/"  # fedtoken.hsm.pkcs11.LABEL_PREFIX: f"fedtoken/{tenant}/{kid}"
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
                                threads=Settings().verify_threads, native=native,
                                token_cache=DISTINCT_CACHE_SIZE)
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


# The service under test trusts the partner's loopback http issuer.
FEDERATION_ENV = {"FEDTOKEN_FEDERATION_ALLOW_HTTP_LOOPBACK": "1"}
# The multi-buffer path off (fedtoken.verifier.multibuffer reads it at import).
MULTIBUFFER_OFF_ENV = {"FEDTOKEN_MULTIBUFFER": "off"}

# The rows of "distinct tokens" replay a token set in a cycle; with the
# verified-token cache at its default bound (8192 per worker, FIFO) a set of
# 5,000 (--quick) would be served entirely from the cache after one pass, and
# one of 20,000 partly (each worker sees only some of the batches between two
# sightings of one). So those services run the default configuration except
# a cache of 16 entries: every token still pays the cache's digest and insert
# (a real stream of new tokens does), none can hit (each replay period is
# longer than 16 tokens). The repeated-token row runs the default cache.
DISTINCT_CACHE_SIZE = 16
DISTINCT_ENV = {"FEDTOKEN_VERIFIED_TOKEN_CACHE_SIZE": str(DISTINCT_CACHE_SIZE)}

# Distinct tokens of the repeated-token (gateway) row: well inside the
# verified-token cache's default bound (8192).
CACHED_DISTINCT = 1000
ISSUE_BATCH_SIZE = 100


@dataclass
class Ctx:
    """What every measurement of one run shares."""

    service: Service
    empty: EmptyServer
    n_tokens: int
    seconds: float
    warmup: float
    ossl_seconds: int
    batches: Sequence[int]
    cmdline: str
    log: Callable[[str], None]
    native: bool
    quick: bool = False
    partner: Service | None = None
    profile_dir: Path | None = None
    profile_native: bool = False

    def profiler(self, row_id: str, server: Service | EmptyServer) -> Profiler | None:
        if self.profile_dir is None or server.proc is None:
            return None
        port = server.grpc_port if isinstance(server, Service) else server.port
        return Profiler(self.profile_dir, row_id, worker_pid(server.proc.pid, port),
                        native=self.profile_native)

    def load(self, row_id: str, server: Service | EmptyServer, method: str,
             requests: Sequence[bytes], per_request: int, connections: int, in_flight: int,
             *, count_valid: bool = True, check: bool = True) -> LoadResult:
        """One measured window of ``requests`` replayed at ``server`` from a
        separate process; every verdict must be valid (``check``)."""
        assert server.proc is not None
        res = run_load(Load(server.target, method, requests, per_request, connections,
                            in_flight, self.seconds, self.warmup, count_valid=count_valid,
                            server_pid=server.proc.pid, tls=server.tls),
                       profiler=self.profiler(row_id, server))
        if check and (res.errors or res.valid != res.tokens):
            raise RuntimeError(f"{row_id} ({method}): {res.errors} errors ({res.first_error}), "
                               f"{res.valid} valid of {res.tokens}")
        return res

    def profile_note(self, row_id: str) -> dict[str, str]:
        if self.profile_dir is None:
            return {}
        return {"profile": str(self.profile_dir / f"{row_id}.top.txt")}


def load_extra(res: LoadResult) -> dict[str, float]:
    """The window's numbers for the JSON file."""
    return {"calls_per_s": round(res.calls_per_s, 1), "tokens_per_s": round(res.tokens_per_s, 1),
            "server_cpu_s": round(res.server_cpu_s, 3),
            "server_cores_busy": round(res.server_cores, 2),
            "tokens_per_server_cpu_s": round(res.tokens_per_cpu_s, 1),
            "window_s": res.seconds}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about a minute: fewer tokens")
    p.add_argument("--tokens", type=int, help="distinct tokens (default 20000, quick 5000)")
    p.add_argument("--seconds", type=float, help="measured seconds per row (default 4, quick 1.5)")
    p.add_argument("--batches", default="1,100,1000,5000", help="VerifyBatch sizes")
    p.add_argument("--dsn", help="admin DSN of a Postgres to use instead of an embedded one")
    p.add_argument("--markdown", type=Path, help="also write the table and machine to this file")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="also write every row by id, with a header object, to FILE")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy one worker during each server-side window: "
                        "DIR/<id>.speedscope.json and DIR/<id>.top.txt (perturbs the figures)")
    p.add_argument("--profile-native", action="store_true",
                   help="with --profile: native frames too (py-spy stops the worker per sample)")
    p.add_argument("--no-revocation", action="store_true",
                   help="skip revocation propagation and memory (bench.revocation)")
    args = p.parse_args(argv)
    n_tokens = args.tokens or (5000 if args.quick else 20000)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    warmup = 0.5 if args.quick else 1.0
    ossl_seconds = 1 if args.quick else 3
    batches = sorted({int(b) for b in args.batches.split(",")})
    cmdline = "python -m bench" + (" --quick" if args.quick else "")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        if py_spy() is None:
            p.error("--profile needs py-spy (pip install py-spy, or scripts/dev setup)")

    def say(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    started = time.monotonic()
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
        from fedtoken.verifier.engine import NATIVE_AVAILABLE

        ctx = Ctx(service, empty, n_tokens, seconds, warmup, ossl_seconds, batches, cmdline,
                  say, NATIVE_AVAILABLE and native_wanted(), quick=args.quick, partner=partner,
                  profile_dir=args.profile, profile_native=args.profile_native)
        try:
            say(f"native fast path: {native_state()}; multi-buffer: {multibuffer_status()}")
            if NATIVE_AVAILABLE and not ctx.native:
                with native_blocked():
                    rows = measure_rows(ctx)
            else:
                rows = measure_rows(ctx)
        finally:
            service.stop()
            partner.stop()
            empty.stop()
            if pg is not None:
                pg.stop()

    if not args.no_revocation:
        say("revocation propagation and memory (bench.revocation)")
        rows += revocation_rows(revocation.run_revocation_bench(quick=args.quick))
    check_ids(rows)
    h = header(tokens=n_tokens, seconds_per_row=seconds, warmup_s=warmup,
               native_fast_path=native_state(), quick=args.quick, commit=git_commit(),
               command=cmdline, profiled=args.profile is not None,
               elapsed_s=round(time.monotonic() - started, 1))
    text = header_line(h) + "\n\n" + table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        write_json(args.json, h, rows)
        say(f"wrote {len(rows)} rows to {args.json}")
    return 0


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "server",
                                "bench", "clients"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (uncommitted changes)" if dirty else "")


def revocation_rows(found: Sequence[dict[str, object]]) -> list[Row]:
    """bench.revocation's rows (plain dicts with ids) as Rows."""
    out = []
    for r in found:
        value = r["value"]
        base_value = r.get("baseline_value") or 0.0
        out.append(Row(str(r["id"]), str(r["figure"]).strip(),
                       float(value) if isinstance(value, int | float) else None,
                       unit=str(r["unit"]), baseline=str(r.get("baseline_label", "")),
                       baseline_value=float(base_value) if isinstance(base_value, int | float)
                       else 0.0, target=str(r["target"]), command=str(r["command"])))
    return out


def openssl_rows(ctx: Ctx) -> tuple[list[Row], float, float]:
    ctx.log("openssl speed rsa2048, 1 process and -multi 2")
    s = ctx.ossl_seconds
    ossl1 = baselines.openssl_verify_rate(s, 1)
    ossl2 = baselines.openssl_verify_rate(s, 2)
    rows = [
        Row("openssl_verify_1proc", "openssl speed RSA-2048 verify, 1 process", ossl1,
            unit="verify/s", command=" ".join(baselines.openssl_command(s, 1))),
        Row("openssl_verify_multi2", "openssl speed RSA-2048 verify, 2 processes", ossl2,
            unit="verify/s", baseline="1 process", baseline_value=ossl1,
            command=" ".join(baselines.openssl_command(s, 2))),
    ]
    return rows, ossl1, ossl2


def limit_rows(ctx: Ctx, ossl1: float) -> list[Row]:
    """The two in-process limits (bench.mbrsa, a process of its own)."""
    ctx.log("in-process limits: crypto_mb vs OpenSSL (bench.mbrsa)")
    items, rounds = (5000, 1) if ctx.quick else (20000, 3)
    cmd = [sys.executable, "-m", "bench.mbrsa", "--items", str(items), "--rounds", str(rounds),
           "--json"]
    shown = f"python -m bench.mbrsa --items {items} --rounds {rounds}"
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False,
                          timeout=600)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["failed"])[-1][:200]
        return [Row("limit_openssl_raw_inprocess", "OpenSSL RSA-2048 verify in-process "
                    "(cryptography, prehashed), 1 thread", None, unit="verify/s",
                    notes=f"bench.mbrsa failed: {why}", command=shown),
                Row("limit_crypto_mb_inprocess", "crypto_mb mbx_rsa_public_mb8 in-process, "
                    "1 thread", None, unit="verify/s", notes=f"bench.mbrsa failed: {why}",
                    command=shown)]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    ossl = float(m["openssl"])
    rows = [Row("limit_openssl_raw_inprocess",
                "OpenSSL RSA-2048 verify in-process (cryptography, prehashed: one public op "
                "+ padding check), 1 thread", ossl, unit="verify/s",
                baseline="openssl speed 1 process", baseline_value=ossl1, command=shown,
                extra={"items": m["items"], "keys": m["keys"]})]
    if m.get("mb_primitive") is None:
        rows.append(Row("limit_crypto_mb_inprocess", "crypto_mb mbx_rsa_public_mb8 in-process, "
                        "1 thread", None, unit="verify/s", command=shown,
                        notes=f"multi-buffer {m['status']}"))
    else:
        rows.append(Row("limit_crypto_mb_inprocess",
                        "crypto_mb mbx_rsa_public_mb8 in-process (fedtoken._mbrsa on prebuilt "
                        "items, lanes of 8), 1 thread", float(m["mb_primitive"]),
                        unit="verify/s", baseline="OpenSSL in-process, same run",
                        baseline_value=ossl, command=shown,
                        extra={"verify_many_wrapper": m["mb_wrapper"], "status": m["status"]}))
    return rows


def hsm_raw_rate(ctx: Ctx, kid: str, tenant: str) -> tuple[float | None, str]:
    """Raw C_Sign/s of one process on the service's token and key (bench.hsmraw)."""
    label = f"{LABEL_PREFIX}{tenant}/{kid}"
    secs = 1.5 if ctx.quick else 3.0
    cmd = [sys.executable, "-m", "bench.hsmraw", "--state-dir", str(ctx.service.state),
           "--label", label, "--kid", kid, "--seconds", str(secs)]
    shown = f"python -m bench.hsmraw --state-dir STATE --label {LABEL_PREFIX}<tenant>/<kid> " \
            f"--kid <kid> --seconds {secs:g}"
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False,
                          timeout=120)
    if done.returncode != 0:
        ctx.log(f"raw C_Sign loop failed: {done.stderr.strip()[-300:]}")
        return None, shown
    return float(json.loads(done.stdout.strip().splitlines()[-1])["signs_per_s"]), shown


def token_kid(token: str) -> str:
    head = token.split(".", 1)[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"])


def issue_rows(ctx: Ctx, raw: float | None, raw_cmd: str, workers: int) -> list[Row]:
    """Issue and IssueBatch through the running service against N x raw C_Sign."""
    service = ctx.service
    bound = raw * workers if raw else 0.0
    base = f"raw C_Sign/s per process x {workers} (python-pkcs11 loop, same token and key)"
    serve_cmd = f"fedtoken serve --workers {workers}; {ctx.cmdline}"
    rows = [Row("hsm_sign_raw_1proc", "SoftHSM2 C_Sign RSA-2048 (CKM_SHA256_RSA_PKCS), raw "
                "python-pkcs11 loop, 1 process", raw, unit="signs/s", command=raw_cmd,
                notes="" if raw else "the raw loop failed (see the log)")]
    # Enough concurrent calls that signing and audit can be shared; the
    # requests (distinct subjects) are encoded before the clock starts.
    n_req = 20000 if not ctx.quick else 5000
    ctx.log(f"Issue, {workers} worker(s)")
    res = ctx.load("issue_ratio", service, "Issue", issue_requests(n_req, AUDIENCE), 1,
                   8 * workers, 8)
    rows.append(Row("issue_ratio", f"Issue RPC, {workers} workers, tokens/s", res.tokens_per_s,
                    baseline=base, baseline_value=bound, target=">= 0.8x",
                    command=serve_cmd + f"  # {8 * workers} connections x 8 in flight",
                    extra={**load_extra(res), **ctx.profile_note("issue_ratio")}))
    fig = f"IssueBatch RPC, batch {ISSUE_BATCH_SIZE}, {workers} workers, tokens/s"
    if not issue_batch_available():
        rows.append(Row("issue_batch_ratio", fig, None, baseline=base, baseline_value=bound,
                        target=">= 0.9x", notes="the generated stubs have no IssueBatch",
                        command=serve_cmd))
        return rows
    ctx.log(f"IssueBatch of {ISSUE_BATCH_SIZE}, {workers} worker(s)")
    requests = issue_batch_requests(n_req, ISSUE_BATCH_SIZE, AUDIENCE)
    # 4 connections per worker, 1 call in flight each: SO_REUSEPORT places
    # connections at random, and with 2 per worker all of them landed on one
    # worker (one HSM process signing: half the bound) in about 1 run in 8.
    res = ctx.load("issue_batch_ratio", service, "IssueBatch", requests, ISSUE_BATCH_SIZE,
                   4 * workers, 1, check=False)
    if res.tokens == 0 and res.errors:
        rows.append(Row("issue_batch_ratio", fig, None, baseline=base, baseline_value=bound,
                        target=">= 0.9x", notes=f"the server refused it: {res.first_error}",
                        command=serve_cmd))
        return rows
    if res.errors or res.valid != res.tokens:
        raise RuntimeError(f"IssueBatch: {res.errors} errors ({res.first_error}), "
                           f"{res.valid} tokens of {res.tokens}")
    rows.append(Row("issue_batch_ratio", fig, res.tokens_per_s, baseline=base,
                    baseline_value=bound, target=">= 0.9x",
                    command=serve_cmd + f"  # {4 * workers} connections x 1 in flight",
                    extra={**load_extra(res), **ctx.profile_note("issue_batch_ratio")}))
    return rows


def _foreign_row(ctx: Ctx, size: int) -> LoadResult | None:
    """VerifyBatch of the partner's tokens on the service (its default tenant
    trusts the partner), once the cache is warm."""
    service, partner = ctx.service, ctx.partner
    if partner is None:
        return None
    ctx.log("partner instance: issuing its tokens; the service trusts it")
    partner.start(1)
    try:
        foreign = asyncio.run(issue_tokens(partner.target, ctx.n_tokens, AUDIENCE,
                                           tls=partner.tls))
        with service.client() as c:
            c.add_trusted_issuer(partner.issuer, tenants=["default"], max_stale_seconds=3600)
            deadline = time.monotonic() + 60
            while not all(i.key_set.usable for i in c.list_trusted_issuers()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the partner's key set never became usable")
                time.sleep(0.2)
        requests = batch_requests(foreign, size, AUDIENCE, tenant="default")
        ctx.log(f"VerifyBatch batch {size} of foreign tokens, 2 worker(s)")
        return ctx.load(f"verify_batch_foreign_b{size}_w2", service, "VerifyBatch", requests,
                        size, 8, 1)  # as the local row: 4 connections per worker
    finally:
        partner.stop()


def measure_rows(ctx: Ctx) -> list[Row]:
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2_grpc

    service, batches, cmdline = ctx.service, ctx.batches, ctx.cmdline
    log = ctx.log
    path = "native fast path" if ctx.native else "Python path"
    serve_cmd = "fedtoken serve --workers {w}; " + cmdline
    big = max((b for b in batches if b > 1), default=None)

    rows, ossl1, ossl2 = openssl_rows(ctx)
    rows += limit_rows(ctx, ossl1)

    log("starting fedtoken serve --workers 2")
    service.start(2, env_extra={**FEDERATION_ENV, **DISTINCT_ENV})
    t0 = time.perf_counter()
    tokens = asyncio.run(issue_tokens(service.target, ctx.n_tokens, AUDIENCE, tls=service.tls))
    log(f"issued {len(set(tokens))} distinct tokens in {time.perf_counter() - t0:.1f} s")
    with sync_channel(service.target, service.tls) as ch:
        keys = token_service_pb2_grpc.TokenServiceStub(ch).GetKeys(pb.GetKeysRequest())
    jwks = baselines.jwks_by_kid([k.public_jwk_json for k in keys.keys])

    log("raw C_Sign loop on the service's token and key (a process of its own)")
    raw, raw_cmd = hsm_raw_rate(ctx, token_kid(tokens[0]), keys.tenant)

    log("PyJWT loop")
    pyjwt = baselines.pyjwt_rate(tokens, jwks, AUDIENCE, keys.issuer, ctx.seconds)
    rows.append(Row("pyjwt_loop", "PyJWT 2.x one-thread loop (kid lookup + jwt.decode aud/iss)",
                    pyjwt, baseline="openssl 1 process", baseline_value=ossl1,
                    command=f"{cmdline}  # in-process"))
    log("engine in-process")
    eng = engine_rate(tokens, keys, 1000, ctx.seconds, native=ctx.native)
    rows.append(Row("engine_inprocess_b1000",
                    f"engine.verify_batch in-process, batch 1000 (no gRPC, no audit), {path}",
                    eng, baseline="openssl 2 processes", baseline_value=ossl2,
                    command=f"{cmdline}  # in-process"))
    if ctx.native:
        log("engine in-process, native fast path off")
        eng_py = engine_rate(tokens, keys, 1000, ctx.seconds, native=False)
        rows.append(Row("engine_inprocess_b1000_python",
                        "engine.verify_batch in-process, batch 1000, Python path (native off)",
                        eng_py, baseline="native fast path", baseline_value=eng,
                        command=f"{NATIVE_ENV}=off {cmdline}  # in-process"))

    requests = {b: batch_requests(tokens, b, AUDIENCE) for b in batches}

    def grpc_rows(workers: int, sizes: Sequence[int] = batches,
                  suffix: str = "") -> dict[int, LoadResult]:
        results: dict[int, LoadResult] = {}
        for b in sizes:
            method = "Verify" if b == 1 else "VerifyBatch"
            # Enough in flight to keep every worker busy, few enough that a
            # call's latency stays well under the measured window.
            in_flight = 8 if b == 1 else 2 if b <= 100 else 1
            # Big batches: 4 connections per worker (SO_REUSEPORT spreads
            # connections at random; with 2 per worker one worker often got
            # most of them).
            conns = 8 * workers if b <= 1000 else 4 * workers
            log(f"{method} batch {b}, {workers} worker(s){suffix and ' ' + suffix}")
            row_id = (f"unary_verify_w{workers}" if b == 1 else
                      f"verify_batch_b{b}_w{workers}") + (f"_{suffix}" if suffix else "")
            results[b] = ctx.load(row_id, service, method, requests[b], b, conns, in_flight)
        return results

    two = grpc_rows(2)

    issue = issue_rows(ctx, raw, raw_cmd, 2)
    foreign = _foreign_row(ctx, big) if big is not None else None
    service.stop()

    # Repeated tokens (a gateway's): the default configuration, cache and all.
    cached: LoadResult | None = None
    if big is not None:
        log("restarting fedtoken serve --workers 2, default configuration")
        service.start(2)
        log(f"VerifyBatch batch {big} of {CACHED_DISTINCT} repeated tokens, 2 worker(s)")
        n_cached = max(4, min(40, 200_000 // big))
        reqs = repeated_batch_requests(tokens, CACHED_DISTINCT, big, n_cached, AUDIENCE)
        cached = ctx.load("verify_cached_cpu_ratio", service, "VerifyBatch", reqs, big,
                          2 * 2, 1)
        service.stop()

    # The multi-buffer path off: the fallback (OpenSSL) row.
    fallback: LoadResult | None = None
    fallback_note = ""
    if big is not None:
        if multibuffer_available():
            log("restarting fedtoken serve --workers 2 with FEDTOKEN_MULTIBUFFER=off")
            service.start(2, env_extra={**MULTIBUFFER_OFF_ENV, **DISTINCT_ENV})
            fallback = grpc_rows(2, [big], suffix="mb_off")[big]
            service.stop()
        else:
            fallback = two[big]
            fallback_note = (f"multi-buffer {multibuffer_status()}: the default run is the "
                             "fallback")

    # The same rows with the Python path, for the ratio in this run.
    python_two: dict[int, LoadResult] = {}
    if ctx.native and any(b >= 1000 for b in batches):
        log("restarting fedtoken serve --workers 2 without the native fast path")
        with native_blocked():
            service.start(2, env_extra=DISTINCT_ENV)
        python_two = grpc_rows(2, [b for b in batches if b >= 1000], suffix="python")
        service.stop()
    log("restarting fedtoken serve --workers 1")
    service.start(1, env_extra=DISTINCT_ENV)
    one = grpc_rows(1)
    service.stop()
    # What mTLS costs: the same rows with the service and the empty handler in
    # plaintext (insecure mode, every caller taken to be the dev operator).
    tls_sizes = [b for b in (1, 1000) if b in batches]
    plain_one: dict[int, LoadResult] = {}
    if tls_sizes:
        log("restarting fedtoken serve --workers 1 in plaintext (TLS cost)")
        service.start(1, insecure=True, env_extra=DISTINCT_ENV)
        plain_one = grpc_rows(1, tls_sizes, suffix="plaintext")
        service.stop()

    def empty_load(row_id: str, insecure: bool) -> LoadResult:
        ctx.empty.start(insecure=insecure)
        try:
            return ctx.load(row_id, ctx.empty, "Verify", requests[1], 1, 8, 8,
                            count_valid=False, check=False)
        finally:
            ctx.empty.stop()

    if 1 in batches:
        log("empty grpc.aio unary handler over mTLS, then in plaintext")
        empty_res = empty_load("empty_unary_mtls", insecure=False)
        empty_plain = empty_load("empty_unary_plaintext", insecure=True)

    # -- the rows of issue 12, first ------------------------------------------------
    head: list[Row] = []
    if big is not None:
        src = f"verify_batch_b{big}_w2"
        r = two[big]
        head.append(Row(
            "verify_batch_cpu_ratio",
            f"VerifyBatch batch {big}, distinct tokens, 2 workers, default config (revocation "
            f"and audit on; token cache {DISTINCT_CACHE_SIZE}, see notes), {path}: tokens per "
            "server CPU-second", r.tokens_per_cpu_s,
            unit="tokens/CPU-s", baseline="openssl speed 1 process", baseline_value=ossl1,
            target=">= 2.5x", command=serve_cmd.format(w=2),
            notes="server CPU: utime+stime of the serve process tree (every worker) over the "
                  "window; Postgres not counted. Distinct-token rows run "
                  f"FEDTOKEN_VERIFIED_TOKEN_CACHE_SIZE={DISTINCT_CACHE_SIZE} so that the cyclic "
                  "replay never hits the cache",
            extra={"source": src, **load_extra(r), **ctx.profile_note(src)}))
        head.append(Row(
            "verify_batch_wall_ratio",
            f"VerifyBatch batch {big}, distinct tokens, 2 workers, default config, {path}",
            r.tokens_per_s, baseline="openssl speed -multi 2", baseline_value=ossl2,
            target=">= 1.5x", command=serve_cmd.format(w=2),
            extra={"source": src, **load_extra(r), **ctx.profile_note(src)}))
        fb = fallback
        assert fb is not None
        fb_src = f"verify_batch_b{big}_w2_mb_off" if not fallback_note else src
        head.append(Row(
            "verify_batch_fallback_wall_ratio",
            f"VerifyBatch batch {big}, distinct tokens, 2 workers, multi-buffer off "
            f"(OpenSSL per token), {path}", fb.tokens_per_s,
            baseline="openssl speed -multi 2", baseline_value=ossl2, target=">= 0.75x",
            command="FEDTOKEN_MULTIBUFFER=off " + serve_cmd.format(w=2), notes=fallback_note,
            extra={"source": fb_src, **load_extra(fb), **ctx.profile_note(fb_src)}))
        assert cached is not None
        head.append(Row(
            "verify_cached_cpu_ratio",
            f"VerifyBatch batch {big}, the same {CACHED_DISTINCT} tokens over and over "
            f"(a gateway's repeated tokens), 2 workers, default config: tokens per server "
            f"CPU-second", cached.tokens_per_cpu_s, unit="tokens/CPU-s",
            baseline="openssl speed 1 process", baseline_value=ossl1, target=">= 10x",
            command=serve_cmd.format(w=2),
            notes="default configuration: through the verified-token cache where the server "
                  "has one",
            extra={**load_extra(cached), **ctx.profile_note("verify_cached_cpu_ratio")}))
    if 1 in batches:
        head.append(Row("unary_ratio", "unary Verify, 1 worker, calls/s", one[1].calls_per_s,
                        unit="calls/s", baseline="empty grpc.aio handler, 1 process",
                        baseline_value=empty_res.calls_per_s, target=">= 0.85x",
                        command=serve_cmd.format(w=1) + "  # 8 connections x 8 in flight",
                        extra={"source": "unary_verify_w1", **load_extra(one[1]),
                               **ctx.profile_note("unary_verify_w1")}))
    head += [r for r in issue if r.id in ("issue_ratio", "issue_batch_ratio")]
    head += [r for r in rows if r.id.startswith("limit_")]

    # -- everything else ------------------------------------------------------------
    rest = [r for r in rows if not r.id.startswith("limit_")]
    rest += [r for r in issue if r.id not in ("issue_ratio", "issue_batch_ratio")]
    for workers, results in ((2, two), (1, one)):
        for b in batches:
            if b == 1:
                continue
            rid = f"verify_batch_b{b}_w{workers}"
            rest.append(Row(
                rid, f"VerifyBatch via gRPC, batch {b}, {workers} worker(s), default config, "
                f"{path}", results[b].tokens_per_s, baseline="openssl 2 processes",
                baseline_value=ossl2, command=serve_cmd.format(w=workers),
                extra={**load_extra(results[b]), **ctx.profile_note(rid)}))
    for b, res in python_two.items():
        rid = f"verify_batch_b{b}_w2_python"
        rest.append(Row(
            rid, f"VerifyBatch via gRPC, batch {b}, 2 worker(s), Python path (native off)",
            res.tokens_per_s, baseline="same with native fast path",
            baseline_value=two[b].tokens_per_s,
            command=f"{NATIVE_ENV}=off " + serve_cmd.format(w=2),
            extra={**load_extra(res), **ctx.profile_note(rid)}))
    if foreign is not None and big is not None:
        rid = f"verify_batch_foreign_b{big}_w2"
        rest.append(Row(
            rid, f"VerifyBatch via gRPC, batch {big}, 2 worker(s), FOREIGN tokens (trusted "
            f"issuer, cache warm), {path}", foreign.tokens_per_s,
            baseline="the same with local tokens", baseline_value=two[big].tokens_per_s,
            target=">= 0.9x (within noise of local)", command=serve_cmd.format(w=2),
            extra={**load_extra(foreign), **ctx.profile_note(rid)}))
    if big is not None:
        rest.append(Row("verify_batch_vs_pyjwt", f"VerifyBatch batch {big}, 2 workers, vs "
                        "PyJWT loop", two[big].tokens_per_s, baseline="PyJWT loop",
                        baseline_value=pyjwt, target=">= 6x", command=serve_cmd.format(w=2)))
    if 1 in batches:
        rest.append(Row("empty_unary_mtls", "empty grpc.aio unary handler, 1 process, mTLS",
                        empty_res.calls_per_s, unit="calls/s",
                        command=f"{cmdline}  # 8 connections x 8 in flight",
                        extra=load_extra(empty_res)))
        rest.append(Row("unary_verify_w2", "unary Verify, 2 workers", two[1].calls_per_s,
                        unit="calls/s", baseline="unary Verify, 1 worker",
                        baseline_value=one[1].calls_per_s,
                        command=serve_cmd.format(w=2) + "  # 16 connections x 8 in flight",
                        extra={**load_extra(two[1]), **ctx.profile_note("unary_verify_w2")}))
        # The load generator is Python too and shares the cores, so the rates
        # above are partly client-bound; per second of server CPU they are not.
        rest.append(Row("empty_unary_cpu", "empty handler, calls per server CPU-second",
                        empty_res.calls_per_cpu_s, unit="calls/CPU-s",
                        command=f"{cmdline}  # psutil CPU time of server"))
        rest.append(Row("unary_cpu_ratio", "unary Verify, 1 worker, calls per server CPU-second",
                        one[1].calls_per_cpu_s, unit="calls/CPU-s", baseline="empty handler",
                        baseline_value=empty_res.calls_per_cpu_s, target=">= 0.85x",
                        command=serve_cmd.format(w=1)))
        rest.append(Row("unary_verify_w2_cpu",
                        "unary Verify, 2 workers, calls per server CPU-second",
                        two[1].calls_per_cpu_s, unit="calls/CPU-s", baseline="1 worker",
                        baseline_value=one[1].calls_per_cpu_s, command=serve_cmd.format(w=2)))
        # The TLS cost: each plaintext figure against its mTLS twin.
        rest.append(Row("empty_unary_plaintext", "empty handler in plaintext (mTLS off)",
                        empty_plain.calls_per_s, unit="calls/s",
                        baseline="empty handler over mTLS", baseline_value=empty_res.calls_per_s,
                        command=f"{cmdline}  # plaintext"))
        if 1 in plain_one:
            rest.append(Row("unary_verify_w1_plaintext",
                            "unary Verify, 1 worker, plaintext (mTLS off)",
                            plain_one[1].calls_per_s, unit="calls/s",
                            baseline="the same over mTLS", baseline_value=one[1].calls_per_s,
                            command="FEDTOKEN_INSECURE=1 " + serve_cmd.format(w=1)))
    if 1000 in plain_one:
        rest.append(Row("verify_batch_b1000_w1_plaintext",
                        "VerifyBatch batch 1000, 1 worker, plaintext (mTLS off)",
                        plain_one[1000].tokens_per_s, baseline="the same over mTLS",
                        baseline_value=one[1000].tokens_per_s,
                        command="FEDTOKEN_INSECURE=1 " + serve_cmd.format(w=1)))
    return head + rest


def multibuffer_available() -> bool:
    try:
        from fedtoken.verifier import multibuffer
    except Exception:
        return False
    return multibuffer.available()
