"""The unary boundary's lean success path: request ids, the principal map,
the certificate cache, the memoized authorization decisions, and Boundary
applied at registration instead of as an interceptor."""

from __future__ import annotations

import re
from typing import Any

import grpc
import pytest

from fedtoken.core.authz import Ask, Role
from fedtoken.core.errors import PermissionDenied, Unauthenticated
from fedtoken.core.ports import CallContext, Principal
from fedtoken.rpc import interceptors as ic
from fedtoken.service.callers import MAX_MEMO, Callers
from fedtoken.tls import identity
from fedtoken.tls.devca import OPERATOR_ID

from .fakes import FakeClock, MemoryAudit, MemoryCallers, MemoryStore

ALICE = "spiffe://fedtoken.dev/alice"


def test_new_request_ids_have_the_uuid4_hex_format_and_differ() -> None:
    ids = {ic.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        assert re.fullmatch(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", rid)


@pytest.mark.parametrize(("metadata", "want"), [
    ((), None),
    (None, None),
    ((("x-request-id", "abc"),), ("abc", "")),
    ((("x-request-id", ""), ("x-request-id", "second")), ("second", "")),
    ((("x-request-id", "x" * 65), ("x-request-id", "ok")), ("ok", "")),
    ((("x-request-id", "bad\n"),), None),
    ((("x-request-id", b"bytes"),), None),
    ((("x-fedtoken-caller", "me\x00you"), ("x-fedtoken-caller", "later")), (None, "meyou")),
    ((("x-fedtoken-caller", "n" * 300),), (None, "n" * 128)),
    ((("x-fedtoken-caller", b"bin"), ("x-fedtoken-caller", "text")), (None, "text")),
])
def test_scan_finds_the_request_id_and_the_declared_name(metadata: Any, want: Any) -> None:
    request_id, declared = ic._scan(metadata)
    if want is None or want[0] is None:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    else:
        assert request_id == want[0]
    assert declared == ("" if want is None else want[1])


class _Context:
    def __init__(self, peer: str = "ipv4:127.0.0.1:1", metadata: Any = ()) -> None:
        self._peer = peer
        self._metadata = metadata

    def invocation_metadata(self) -> Any:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None


async def test_principals_are_shared_per_triple_and_identity_is_read_every_call() -> None:
    who = [ALICE]
    seen: list[CallContext] = []

    async def behavior(request: Any, context: Any) -> str:
        seen.append(ic.call_context())
        return "ok"

    handler = ic.wrap_unary("Verify", behavior, lambda _c: who[0])
    ctx = _Context()
    assert await handler(object(), ctx) == "ok"
    assert await handler(object(), ctx) == "ok"
    who[0] = OPERATOR_ID  # the certificate says otherwise now: a new principal
    await handler(object(), ctx)
    await handler(object(), _Context(peer="ipv4:127.0.0.1:2"))
    await handler(object(), _Context(metadata=(("x-fedtoken-caller", "named"),)))
    p = [c.principal for c in seen]
    assert p[0] is p[1] and p[0] == Principal(ALICE, "ipv4:127.0.0.1:1", "")
    assert p[2] == Principal(OPERATOR_ID, "ipv4:127.0.0.1:1", "")
    assert p[3] == Principal(OPERATOR_ID, "ipv4:127.0.0.1:2", "")
    assert p[4] == Principal(OPERATOR_ID, "ipv4:127.0.0.1:1", "named")
    assert len({c.request_id for c in seen}) == 5
    assert all(c.method == "Verify" for c in seen)


async def test_the_principal_map_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ic, "MAX_PRINCIPALS", 4)
    seen: list[Principal] = []

    async def behavior(request: Any, context: Any) -> None:
        seen.append(ic.call_context().principal)

    handler = ic.wrap_unary("Verify", behavior, lambda _c: ALICE)
    for i in range(10):
        await handler(object(), _Context(peer=f"ipv4:127.0.0.1:{i}"))
    assert [p.peer for p in seen] == [f"ipv4:127.0.0.1:{i}" for i in range(10)]
    closure = [c.cell_contents for c in handler.__closure__ or () if isinstance(
        c.cell_contents, dict)]
    assert closure and all(len(m) <= 4 for m in closure)


async def test_an_unauthenticated_call_never_reaches_the_servicer() -> None:
    called = []

    async def behavior(request: Any, context: Any) -> None:
        called.append(1)

    def refuse(_c: Any) -> str:
        raise Unauthenticated("no client certificate: connect with mTLS")

    class Aborting(_Context):
        async def abort(self, status: Any, message: str, trailing_metadata: Any) -> None:
            raise grpc.aio.AbortError(status, message)

    handler = ic.wrap_unary("Verify", behavior, refuse)
    with pytest.raises(grpc.aio.AbortError):
        await handler(object(), Aborting())
    assert not called


def test_spiffe_id_cache_is_bounded_and_keeps_failures(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Any) -> None:
    from fedtoken.tls.devca import ensure_dev_pki

    data = ensure_dev_pki(tmp_path).operator.cert.read_bytes()
    monkeypatch.setattr(identity, "_CACHE_SIZE", 2)
    monkeypatch.setattr(identity, "_cache", {})
    assert identity.spiffe_id_of({"x509_pem_cert": [data]}) == OPERATOR_ID
    assert identity.spiffe_id_of({"x509_pem_cert": (data,)}) == OPERATOR_ID
    for junk in (b"junk-1", b"junk-2", b"junk-3"):
        for _ in range(2):  # a cached failure is raised again, every time
            with pytest.raises(Unauthenticated, match="cannot be parsed"):
                identity.spiffe_id_of({"x509_pem_cert": [junk]})
    assert len(identity._cache) <= 2 and data not in identity._cache
    assert identity.spiffe_id_of({"x509_pem_cert": [data]}) == OPERATOR_ID
    for bad in ({}, {"x509_pem_cert": []}, {"x509_pem_cert": [data, data]},
                {"x509_pem_cert": ["text"]}):
        with pytest.raises(Unauthenticated, match="no client certificate"):
            identity.spiffe_id_of(bad)


def _callers() -> tuple[Callers, MemoryCallers]:
    clock = FakeClock()
    repo = MemoryCallers()
    callers = Callers(repo=repo, audit=MemoryAudit(MemoryStore(clock)), clock=clock,
                      bootstrap=[OPERATOR_ID])
    return callers, repo


async def test_memoized_decisions_follow_every_grant_and_revocation() -> None:
    callers, _ = _callers()
    admin = CallContext(Principal(OPERATOR_ID, "p"), "r", "GrantCaller")
    alice = CallContext(Principal(ALICE, "p"), "r", "Verify")
    with pytest.raises(PermissionDenied):
        await callers.require(alice, Ask(Role.VERIFIER, "t1"))
    assert await callers.scope(CallContext(Principal(OPERATOR_ID, "p")), Role.VERIFIER) is None
    await callers.grant(ALICE, "verifier", ["t1"], [], 0, admin)
    await callers.require(alice, Ask(Role.VERIFIER, "t1"))
    assert await callers.scope(alice, Role.VERIFIER) == frozenset({"t1"})
    with pytest.raises(PermissionDenied):
        await callers.require(alice, Ask(Role.VERIFIER, "t2"))
    await callers.revoke(ALICE, "verifier", admin)
    with pytest.raises(PermissionDenied):
        await callers.require(alice, Ask(Role.VERIFIER, "t1"))
    with pytest.raises(PermissionDenied):
        await callers.scope(alice, Role.VERIFIER)
    await callers.grant(ALICE, "verifier", [], [], 0, admin)
    await callers.require(alice, Ask(Role.VERIFIER, "t2"))
    assert await callers.scope(alice, Role.VERIFIER) is None


async def test_a_grant_changed_elsewhere_takes_effect_at_the_reload() -> None:
    callers, repo = _callers()
    admin = CallContext(Principal(OPERATOR_ID, "p"), "r", "GrantCaller")
    alice = CallContext(Principal(ALICE, "p"), "r", "Verify")
    await callers.grant(ALICE, "verifier", ["t1"], [], 0, admin)
    await callers.require(alice, Ask(Role.VERIFIER, "t1"))
    await repo.remove(ALICE, None)  # another replica revoked it
    await callers.require(alice, Ask(Role.VERIFIER, "t1"))  # as before: until the reload
    callers.notice({"type": "callers"})
    await callers.reload()
    with pytest.raises(PermissionDenied):
        await callers.require(alice, Ask(Role.VERIFIER, "t1"))


async def test_issuer_asks_are_decided_every_time_and_the_memo_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtoken.service.callers as mod

    callers, _ = _callers()
    admin = CallContext(Principal(OPERATOR_ID, "p"), "r", "GrantCaller")
    alice = CallContext(Principal(ALICE, "p"), "r", "Issue")
    await callers.grant(ALICE, "issuer", ["t1"], ["aud-a"], 600, admin)
    await callers.require(alice, Ask(Role.ISSUER, "t1", ("aud-a",), 600))
    with pytest.raises(PermissionDenied):
        await callers.require(alice, Ask(Role.ISSUER, "t1", ("aud-b",), 600))
    with pytest.raises(PermissionDenied):
        await callers.require(alice, Ask(Role.ISSUER, "t1", ("aud-a",), 601))
    monkeypatch.setattr(mod, "MAX_MEMO", 3)
    assert MAX_MEMO >= 3
    for i in range(10):
        with pytest.raises(PermissionDenied):
            await callers.require(CallContext(Principal(f"spiffe://x/{i}")), Ask(Role.VERIFIER))
    assert len(callers._denials) <= 3


class _Server:
    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered[service] = handlers


async def test_register_wraps_what_a_generated_add_to_server_registers() -> None:
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2 as pb
    from fedtoken_client._pb.fedtoken.v1 import token_service_pb2_grpc

    class Servicer(token_service_pb2_grpc.TokenServiceServicer):
        async def Verify(self, request: Any, context: Any) -> Any:
            return pb.VerifyResponse(verdict=pb.Verdict(
                valid=True, subject=ic.call_context().principal.identity))

    boundary = ic.Boundary(lambda _c: ALICE)
    server = _Server()
    boundary.register(token_service_pb2_grpc.add_TokenServiceServicer_to_server, Servicer(),
                      server)
    registered = server.registered["fedtoken.v1.TokenService"]
    verify = registered["Verify"]

    class Details:
        method = "/fedtoken.v1.TokenService/Verify"

    assert server.generic[0].service(Details()) is verify
    assert await boundary.intercept_service(_never, Details()) is verify  # type: ignore[arg-type]
    request = verify.request_deserializer(pb.VerifyRequest(token="t").SerializeToString())
    response = await verify.unary_unary(request, _Context())
    assert response.verdict.subject == ALICE
    assert verify.request_deserializer(b"\xff\xff") is ic._UNDECODABLE

    class Unknown:
        method = "/fedtoken.v1.TokenService/Nope"

    assert server.generic[0].service(Unknown()) is None


async def _never(_details: Any) -> Any:
    raise AssertionError("the cached handler is returned without asking")
