"""The load generator: a separate process that replays pre-encoded requests.

Requests are serialised before the clock starts and sent as bytes, so the
client's Python work per call is small; responses are parsed to count valid
verdicts (a rate on rejected tokens would be meaningless). Several channels,
each its own TCP connection, so that SO_REUSEPORT spreads them over the
server's workers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from bench.profile import Profiler

SERVICE = "/fedtoken.v1.TokenService/"


@dataclass(frozen=True)
class LoadResult:
    calls_per_s: float
    tokens_per_s: float
    valid: int  # valid verdicts among the calls that overlapped the window, -1 if not counted
    tokens: int  # tokens of the calls that overlapped the window
    errors: int
    server_cpu_s: float  # CPU seconds the server processes used during the window

    @property
    def calls_per_cpu_s(self) -> float:
        """Calls per second of server CPU: what one core would serve if the
        client took none (on 2 cores the Python client competes for CPU)."""
        return self.calls_per_s * (self.seconds / self.server_cpu_s) if self.server_cpu_s else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        """Tokens per second of server CPU (utime + stime of the server's
        whole process tree, every worker, over the window)."""
        return self.tokens_per_s * (self.seconds / self.server_cpu_s) if self.server_cpu_s else 0.0

    @property
    def server_cores(self) -> float:
        """Cores the server kept busy on average during the window."""
        return self.server_cpu_s / self.seconds if self.seconds else 0.0

    seconds: float = 0.0
    first_error: str = ""  # the first failed call's status and details, if any


@dataclass(frozen=True)
class Load:
    target: str
    method: str  # "Verify", "VerifyBatch", "Issue" or "IssueBatch"
    requests: Sequence[bytes]
    tokens_per_request: int
    connections: int
    in_flight: int  # per connection
    seconds: float
    warmup: float
    count_valid: bool = True
    server_pid: int = 0  # its CPU time (and its children's) is measured
    # mTLS (ca, client cert, client key PEM paths); None: plaintext.
    tls: tuple[str, str, str] | None = None


def open_channel(target: str, tls: tuple[str, str, str] | None,
                 options: list[tuple[str, object]]) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    ca, cert, key = (Path(p).read_bytes() for p in tls)
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    return grpc.aio.secure_channel(target, creds, options=options)


def _parse_valid(method: str, data: bytes) -> int:
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb

    if method == "VerifyBatch":
        return sum(v.valid for v in pb.VerifyBatchResponse.FromString(data).verdicts)
    if method == "Issue":
        return int(bool(pb.IssueResponse.FromString(data).token))
    if method == "IssueBatch":
        batch = pb.IssueBatchResponse  # type: ignore[attr-defined]
        return sum(bool(r.token) for r in batch.FromString(data).responses)
    return int(pb.VerifyResponse.FromString(data).verdict.valid)


async def _drive(load: Load, on_window: Callable[[], None] = lambda: None) -> LoadResult:
    channels = [
        open_channel(load.target, load.tls, [
            ("grpc.use_local_subchannel_pool", 1),
            ("fedtoken.bench.channel", i),  # distinct args: distinct connections
            ("grpc.max_receive_message_length", 128 << 20),
            ("grpc.max_send_message_length", 128 << 20),
        ])
        for i in range(load.connections)
    ]
    for ch in channels:
        await ch.channel_ready()
    stubs = [ch.unary_unary(SERVICE + load.method) for ch in channels]
    requests = load.requests
    n = len(requests)
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + load.warmup
    stop_at = measure_from + load.seconds
    # A call's tokens are credited in proportion to the part of its duration
    # inside the window, so batches that take longer than the window still
    # count fairly.
    credit = [0.0, 0.0]  # calls, tokens
    seen = [0, 0, 0]  # tokens, valid, errors among calls overlapping the window
    next_index = [0]
    cpu: list[float] = []
    first_error: list[str] = []

    def window_begins() -> None:
        cpu.append(_server_cpu(load.server_pid))
        on_window()

    loop.call_at(measure_from, window_begins)
    loop.call_at(stop_at, lambda: cpu.append(_server_cpu(load.server_pid)))

    async def worker(stub: grpc.aio.UnaryUnaryMultiCallable) -> None:
        while True:
            i = next_index[0]
            next_index[0] = i + 1
            began = loop.time()
            if began >= stop_at:
                return
            try:
                data = await stub(requests[i % n], timeout=300)
            except grpc.RpcError as exc:
                data = None
                if not first_error:
                    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
                    details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else ""
                    first_error.append(f"{code}: {details}"[:300])
            ended = loop.time()
            overlap = min(ended, stop_at) - max(began, measure_from)
            if overlap <= 0:
                continue
            if data is None:
                seen[2] += 1
                continue
            share = overlap / max(ended - began, 1e-9)
            credit[0] += share
            credit[1] += share * load.tokens_per_request
            seen[0] += load.tokens_per_request
            if load.count_valid:
                seen[1] += _parse_valid(load.method, data)

    await asyncio.gather(*(worker(stub) for stub in stubs for _ in range(load.in_flight)))
    for ch in channels:
        await ch.close()
    return LoadResult(
        calls_per_s=credit[0] / load.seconds,
        tokens_per_s=credit[1] / load.seconds,
        valid=seen[1] if load.count_valid else -1,
        tokens=seen[0],
        errors=seen[2],
        server_cpu_s=cpu[1] - cpu[0] if len(cpu) == 2 else 0.0,
        seconds=load.seconds,
        first_error=first_error[0] if first_error else "",
    )


def _server_cpu(pid: int) -> float:
    if not pid:
        return 0.0
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


_WINDOW = "window"  # sent by the load process when its measurement window begins


def _child(load: Load, conn: multiprocessing.connection.Connection) -> None:
    conn.send(asyncio.run(_drive(load, on_window=lambda: conn.send(_WINDOW))))
    conn.close()


def run_load(load: Load, profiler: Profiler | None = None) -> LoadResult:
    """Run ``load`` in a fresh process and return what it measured.
    ``profiler``: started when the window begins, finished after it."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(load, child), name="bench-load")
    proc.start()
    child.close()
    try:
        msg = parent.recv()
        if msg == _WINDOW:
            if profiler is not None:
                profiler.start(load.seconds)
            msg = parent.recv()
        result: LoadResult = msg
    finally:
        proc.join(30)
        if profiler is not None:
            profiler.finish()
    return result


def batch_requests(tokens: Sequence[str], size: int, audience: str,
                   tenant: str = "") -> list[bytes]:
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb

    if size == 1:
        return [pb.VerifyRequest(token=t, audience=audience, tenant=tenant).SerializeToString()
                for t in tokens]
    return [
        pb.VerifyBatchRequest(tokens=tokens[i : i + size], audience=audience,
                              tenant=tenant).SerializeToString()
        for i in range(0, len(tokens) - size + 1, size)
    ]


def issue_requests(count: int, audience: str, prefix: str = "bench-issue") -> list[bytes]:
    """``count`` pre-encoded IssueRequests, each for a distinct subject."""
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb

    return [pb.IssueRequest(subject=f"{prefix}-{i}", audience=[audience],
                            lifetime_seconds=3600).SerializeToString() for i in range(count)]


def issue_batch_available() -> bool:
    """Whether the generated stubs have the IssueBatch RPC and its messages."""
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name.get("TokenService")
    return (service is not None and "IssueBatch" in service.methods_by_name
            and getattr(pb, "IssueBatchRequest", None) is not None
            and getattr(pb, "IssueBatchResponse", None) is not None)


def issue_batch_requests(count: int, size: int, audience: str,
                         prefix: str = "bench-issue-batch") -> list[bytes]:
    """Pre-encoded IssueBatchRequests of ``size`` items, ``count`` items in
    all (distinct subjects); needs ``issue_batch_available()``."""
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb

    batch = getattr(pb, "IssueBatchRequest")  # noqa: B009 - absent before IssueBatch lands
    out = []
    for start in range(0, count - size + 1, size):
        items = [pb.IssueRequest(subject=f"{prefix}-{i}", audience=[audience],
                                 lifetime_seconds=3600) for i in range(start, start + size)]
        out.append(batch(requests=items).SerializeToString())
    return out


def repeated_batch_requests(tokens: Sequence[str], distinct: int, size: int, count: int,
                            audience: str) -> list[bytes]:
    """``count`` VerifyBatchRequests of ``size`` tokens drawn in turn from the
    first ``distinct`` tokens: a gateway's repeated tokens."""
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb

    small = list(tokens[:distinct])
    out = []
    for k in range(count):
        items = [small[(k * size + j) % len(small)] for j in range(size)]
        out.append(pb.VerifyBatchRequest(tokens=items, audience=audience).SerializeToString())
    return out


async def issue_tokens(target: str, count: int, audience: str, concurrency: int = 32,
                       tls: tuple[str, str, str] | None = None) -> list[str]:
    """``count`` distinct tokens from the service's Issue RPC."""
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb

    channels = [open_channel(target, tls, [
        ("grpc.use_local_subchannel_pool", 1), ("fedtoken.bench.channel", i)]) for i in range(8)]
    stubs = [ch.unary_unary(SERVICE + "Issue", request_serializer=pb.IssueRequest.SerializeToString,
                            response_deserializer=pb.IssueResponse.FromString) for ch in channels]
    tokens: list[str] = [""] * count
    next_index = [0]

    async def worker(k: int) -> None:
        stub = stubs[k % len(stubs)]
        while next_index[0] < count:
            i = next_index[0]
            next_index[0] += 1
            req = pb.IssueRequest(subject=f"bench-user-{i}", audience=[audience],
                                  lifetime_seconds=3600)
            tokens[i] = (await stub(req, timeout=60)).token

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    for ch in channels:
        await ch.close()
    return tokens

