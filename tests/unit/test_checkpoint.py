"""Signed audit checkpoints: the pure part (canonical form, what is signed,
parsing, verification and the check of a file against a chain) and the
service that signs them, over in-memory ports. The key is a software RSA
key here; the server signs in the HSM (tests/e2e/test_audit_checkpoints.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fedtoken.audit.checkpoint_file import FileCheckpointJournal
from fedtoken.core.audit import AuditEvent
from fedtoken.core.checkpoint import (
    CHECKPOINT_LABEL_PREFIX,
    SIGNING_CONTEXT,
    Checkpoint,
    CheckpointFormatError,
    CheckpointProblem,
    SignedCheckpoint,
    canonical,
    parse_line,
    pinned_keys,
    signing_input,
    verify,
    verify_checkpoints,
)
from fedtoken.core.errors import HsmUnavailable, PolicyViolation
from fedtoken.core.jwk import b64url_encode, rsa_public_jwk, rsa_thumbprint
from fedtoken.core.ports import GeneratedKey
from fedtoken.service.checkpoints import ChainRewritten, Checkpoints
from tests.unit.fakes import FakeClock, MemoryStore, rsa_key

H1 = bytes(range(32))
H2 = bytes(range(1, 33))


def _kid(key: rsa.RSAPrivateKey) -> str:
    n = key.public_key().public_numbers()
    return rsa_thumbprint(n.n, n.e)


def _sign(key: rsa.RSAPrivateKey, cp: Checkpoint) -> SignedCheckpoint:
    return SignedCheckpoint(cp, key.sign(signing_input(cp), padding.PKCS1v15(), hashes.SHA256()))


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa_key("checkpoint")


@pytest.fixture(scope="module")
def other() -> rsa.RSAPrivateKey:
    return rsa_key("checkpoint-other")


# --- canonical form and signature ---------------------------------------------------


def test_the_canonical_form_is_sorted_compact_ascii_json() -> None:
    cp = Checkpoint(seq=42, hash=H1, time=1_700_000_000, kid="k-1")
    assert canonical(cp) == (
        b'{"hash":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",'
        b'"kid":"k-1","seq":42,"time":1700000000,"v":1}')
    assert signing_input(cp) == b"fedtoken audit checkpoint v1\n" + canonical(cp)
    assert SIGNING_CONTEXT.endswith(b"\n")


def test_a_signed_line_round_trips_and_verifies(key: rsa.RSAPrivateKey) -> None:
    signed = _sign(key, Checkpoint(seq=7, hash=H1, time=1, kid=_kid(key)))
    line = signed.line()
    assert "\n" not in line and " " not in line
    assert json.loads(line)["sig"] == b64url_encode(signed.sig)
    assert list(json.loads(line)) == sorted(json.loads(line))
    assert parse_line(line) == signed
    assert verify(parse_line(line), key.public_key())


@pytest.mark.parametrize("change", [
    {"seq": 8}, {"hash": H2}, {"time": 2},
])
def test_any_change_breaks_the_signature(key: rsa.RSAPrivateKey, change: dict[str, Any]) -> None:
    signed = _sign(key, Checkpoint(seq=7, hash=H1, time=1, kid=_kid(key)))
    forged = SignedCheckpoint(dataclasses.replace(signed.checkpoint, **change), signed.sig)
    assert not verify(forged, key.public_key())


def test_another_key_or_a_kid_not_of_the_key_does_not_verify(
    key: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey,
) -> None:
    mine = _sign(key, Checkpoint(seq=7, hash=H1, time=1, kid=_kid(key)))
    assert not verify(mine, other.public_key())
    # Signed by the right key but naming another kid: refused, the kid must
    # be the verifying key's thumbprint.
    renamed = _sign(key, Checkpoint(seq=7, hash=H1, time=1, kid=_kid(other)))
    assert not verify(renamed, key.public_key())
    # A JWS-style signature over the bare canonical form (no context) is not one.
    cp = mine.checkpoint
    bare = SignedCheckpoint(cp, key.sign(canonical(cp), padding.PKCS1v15(), hashes.SHA256()))
    assert not verify(bare, key.public_key())


def _line(**members: Any) -> str:
    base: dict[str, Any] = {"v": 1, "seq": 3, "hash": H1.hex(), "time": 5, "kid": "k",
                            "sig": b64url_encode(b"\x01" * 256)}
    base.update(members)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


@pytest.mark.parametrize("text", [
    "[]", "not json", "{}",
    _line(v=2), _line(v=True), _line(seq=0), _line(seq=True), _line(seq="3"), _line(time=-1),
    _line(time=1.5), _line(hash=H1.hex().upper()), _line(hash=H1.hex()[:-2]),
    _line(kid=""), _line(kid="a b"), _line(sig="AAAA="), _line(sig="a+b/"), _line(sig=5),
    _line(extra=1), _line(sig=...), _line(kid=...),
    '{"v":1,"v":1,"seq":3,"hash":"' + H1.hex() + '","time":5,"kid":"k","sig":"AQ"}',
    _line(kid="x" * 5000),
])
def test_malformed_lines_are_refused(text: str) -> None:
    with pytest.raises(CheckpointFormatError):
        parse_line(text)


def test_pinned_keys_take_a_jwk_or_a_jwks(
    key: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey,
) -> None:
    def jwk(k: rsa.RSAPrivateKey) -> dict[str, Any]:
        n = k.public_key().public_numbers()
        return rsa_public_jwk(n.n, n.e)

    assert set(pinned_keys(jwk(key))) == {_kid(key)}
    assert set(pinned_keys({"keys": [jwk(key), jwk(other)]})) == {_kid(key), _kid(other)}
    with pytest.raises(PolicyViolation):
        pinned_keys({**jwk(key), "kid": _kid(other)})  # a kid that is not its thumbprint
    with pytest.raises(PolicyViolation):
        pinned_keys({**jwk(key), "d": "AQ"})  # private material
    with pytest.raises(PolicyViolation):
        pinned_keys({"keys": []})


# --- a file of checkpoints against a chain ------------------------------------------


def _file(key: rsa.RSAPrivateKey, *points: tuple[int, bytes]) -> list[str]:
    return [_sign(key, Checkpoint(seq=s, hash=h, time=s, kid=_kid(key))).line() + "\n"
            for s, h in points]


def _chain(n: int) -> dict[int, bytes]:
    return {seq: seq.to_bytes(32, "big") for seq in range(1, n + 1)}


def test_checkpoints_that_the_chain_extends_pass(key: rsa.RSAPrivateKey) -> None:
    chain = _chain(10)
    lines = [*_file(key, (3, chain[3]), (7, chain[7])), "\n"]
    report = verify_checkpoints(lines, {_kid(key): key.public_key()}, chain.get, chain_ok=True)
    assert report.ok and report.checked == 2 and report.problem is None


@pytest.mark.parametrize(("mutate", "problem", "line", "seq"), [
    ("rewritten", CheckpointProblem.HASH_MISMATCH, 1, 3),
    ("truncated", CheckpointProblem.ROW_MISSING, 2, 7),
    ("forged", CheckpointProblem.BAD_SIGNATURE, 2, 9),
    ("garbage", CheckpointProblem.MALFORMED, 2, None),
    ("broken", CheckpointProblem.CHAIN_BROKEN, None, None),
])
def test_the_first_failing_checkpoint_is_named(
    key: rsa.RSAPrivateKey, mutate: str, problem: CheckpointProblem, line: int | None,
    seq: int | None,
) -> None:
    chain = _chain(10)
    lines = _file(key, (3, chain[3]), (7, chain[7]))
    chain_ok = True
    if mutate == "rewritten":  # every hash differs, consistently
        chain = {s: h[::-1] for s, h in chain.items()}
    elif mutate == "truncated":
        chain = {s: h for s, h in chain.items() if s < 5}
    elif mutate == "forged":  # a signed line whose seq was edited
        data = json.loads(lines[1])
        data["seq"] = 9
        lines[1] = json.dumps(data)
    elif mutate == "garbage":
        lines[1] = '{"v":1}'
    elif mutate == "broken":
        chain_ok = False
    report = verify_checkpoints(lines, {_kid(key): key.public_key()}, chain.get,
                                chain_ok=chain_ok, chain_detail="row 5: ALTERED")
    assert not report.ok and report.problem is problem
    assert (report.line, report.seq) == (line, seq)
    assert report.as_dict()["problem"] == problem.value
    if mutate == "broken":
        assert report.checked == 2 and report.detail == "row 5: ALTERED"


def test_a_checkpoint_of_an_unpinned_key_or_no_checkpoint_fails(
    key: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey,
) -> None:
    chain = _chain(4)
    report = verify_checkpoints(_file(other, (2, chain[2])), {_kid(key): key.public_key()},
                                chain.get, chain_ok=True)
    assert report.problem is CheckpointProblem.KEY_MISMATCH and report.seq == 2
    empty = verify_checkpoints(["\n"], {_kid(key): key.public_key()}, chain.get, chain_ok=True)
    assert not empty.ok and empty.problem is CheckpointProblem.NO_CHECKPOINTS


# --- the service, over in-memory ports ----------------------------------------------


class SoftCheckpointSigner:
    """A CheckpointSigner with a software key (the HSM's stand-in)."""

    def __init__(self, private: rsa.RSAPrivateKey) -> None:
        self.private = private
        self.exists = False
        self.fail = False
        self.created = 0
        n = private.public_key().public_numbers()
        jwk = rsa_public_jwk(n.n, n.e)
        self.key = GeneratedKey(kid=jwk["kid"], hsm_label=CHECKPOINT_LABEL_PREFIX + jwk["kid"],
                                public_jwk=jwk, key_size=2048)

    async def checkpoint_key(self, *, create: bool = True) -> GeneratedKey | None:
        if self.fail:
            raise HsmUnavailable("the HSM is unavailable")
        if not self.exists and create:
            self.exists, self.created = True, self.created + 1
        return self.key if self.exists else None

    async def sign_checkpoint(self, hsm_label: str, kid: str, data: bytes) -> bytes:
        if self.fail:
            raise HsmUnavailable("the HSM is unavailable")
        assert (hsm_label, kid) == (self.key.hsm_label, self.key.kid)
        return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())


class MemoryJournal:
    where = "memory"

    def __init__(self, lines: list[str] | None = None) -> None:
        self.lines = lines or []
        self.jwk: dict[str, Any] | None = None

    async def last(self) -> str | None:
        return self.lines[-1] if self.lines else None

    async def append(self, line: str) -> None:
        self.lines.append(line)

    async def publish_key(self, jwk: dict[str, Any]) -> str:
        self.jwk = jwk
        return "memory"


class LockingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.locked: list[int] = []

    @asynccontextmanager
    async def advisory_lock(self, key: int) -> AsyncIterator[None]:
        self.locked.append(key)
        yield


def _world(key: rsa.RSAPrivateKey, journal: MemoryJournal | None = None
           ) -> tuple[LockingStore, SoftCheckpointSigner, MemoryJournal, Checkpoints]:
    store, signer, journal = LockingStore(), SoftCheckpointSigner(key), journal or MemoryJournal()
    return store, signer, journal, Checkpoints(store=store, signer=signer, journal=journal,
                                               clock=FakeClock(1_700_000_000))


def _append(store: MemoryStore, n: int) -> None:
    for i in range(n):
        store.append_event(AuditEvent(event_type="token.issued", subject=f"s{i}"))


async def test_the_key_is_made_once_under_a_lock_and_published(key: rsa.RSAPrivateKey) -> None:
    store, signer, journal, checkpoints = _world(key)
    made = await checkpoints.prepare()
    assert made == signer.key and journal.jwk == signer.key.public_jwk
    assert await checkpoints.prepare() is made and signer.created == 1 and len(store.locked) == 1


async def test_the_head_is_signed_when_it_moves(key: rsa.RSAPrivateKey) -> None:
    store, _, journal, checkpoints = _world(key)
    assert await checkpoints.checkpoint() is None and journal.lines == []  # empty chain
    _append(store, 3)
    first = await checkpoints.checkpoint()
    assert first is not None and (first.checkpoint.seq, first.checkpoint.time) == (3, 1_700_000_000)
    assert first.checkpoint.hash == store.data.audit[-1].hash
    assert verify(parse_line(journal.lines[-1]), key.public_key())
    assert await checkpoints.checkpoint() is None and len(journal.lines) == 1  # did not move
    for more in (1, 2, 5, 16, 33):
        _append(store, more)
        signed = await checkpoints.checkpoint()
        assert signed is not None and signed.checkpoint.seq == len(store.data.audit)
        assert signed.checkpoint.hash == store.data.audit[-1].hash
    chain = {r.seq: r.hash for r in store.data.audit}
    report = verify_checkpoints(journal.lines, {_kid(key): key.public_key()}, chain.get,
                                chain_ok=True)
    assert report.ok and report.checked == 6


async def test_a_rewritten_chain_is_not_signed_over(key: rsa.RSAPrivateKey) -> None:
    store, _, journal, checkpoints = _world(key)
    _append(store, 4)
    assert await checkpoints.checkpoint() is not None
    # A superuser rewrites the chain: the checkpointed row 4 gets another hash.
    store.data.audit[3] = dataclasses.replace(store.data.audit[3], hash=H2)
    _append(store, 1)
    with pytest.raises(ChainRewritten, match="row 4 of the audit chain has hash"):
        await checkpoints.checkpoint()
    del store.data.audit[2:]
    with pytest.raises(ChainRewritten, match="no row 4"):
        await checkpoints.checkpoint()
    assert len(journal.lines) == 1


async def test_a_restart_continues_from_the_journal(key: rsa.RSAPrivateKey) -> None:
    store, _, journal, checkpoints = _world(key)
    _append(store, 2)
    await checkpoints.checkpoint()
    again = Checkpoints(store=store, signer=SoftCheckpointSigner(key), journal=journal,
                        clock=FakeClock(1_700_000_060))
    store.calls.clear()
    assert await again.checkpoint() is None
    assert store.calls["audit.verify_chain"] == 0  # anchored: no full walk
    store.data.audit[1] = dataclasses.replace(store.data.audit[1], hash=H1)
    with pytest.raises(ChainRewritten):
        await again.checkpoint()


async def test_the_first_checkpoint_needs_a_chain_that_verifies(key: rsa.RSAPrivateKey) -> None:
    store, _, journal, checkpoints = _world(key)
    _append(store, 3)
    store.data.audit[1] = dataclasses.replace(
        store.data.audit[1], event=AuditEvent(event_type="token.issued", subject="mallory"))
    with pytest.raises(ChainRewritten, match="does not verify"):
        await checkpoints.checkpoint()
    assert journal.lines == []


async def test_an_unavailable_hsm_writes_nothing_and_the_next_round_catches_up(
    key: rsa.RSAPrivateKey,
) -> None:
    store, signer, journal, checkpoints = _world(key)
    _append(store, 2)
    signer.fail = True
    with pytest.raises(HsmUnavailable):
        await checkpoints.checkpoint()
    assert journal.lines == [] and journal.jwk is None
    signer.fail = False
    signed = await checkpoints.checkpoint()
    assert signed is not None and signed.checkpoint.seq == 2 and len(journal.lines) == 1


# --- the file journal ---------------------------------------------------------------


async def test_the_file_journal_appends_whole_lines_and_cuts_a_torn_one(tmp_path: Path) -> None:
    journal = FileCheckpointJournal(tmp_path / "audit")
    assert await journal.last() is None
    await journal.append('{"a":1}')
    await journal.append('{"a":2}')
    assert await journal.last() == '{"a":2}'
    assert stat.S_IMODE(os.stat(journal.path).st_mode) & 0o133 == 0  # 0644 at most
    with journal.path.open("ab") as f:
        f.write(b'{"a":3')  # a crash mid-write
    assert await journal.last() == '{"a":2}'
    assert journal.path.read_bytes() == b'{"a":1}\n{"a":2}\n'
    with pytest.raises(ValueError, match="newline"):
        await journal.append("a\nb")
    for i in range(40):  # more than the tail it reads
        await journal.append(json.dumps({"i": i, "pad": "x" * 400}))
    assert json.loads(await journal.last() or "")["i"] == 39
    assert await journal.publish_key({"kty": "RSA", "kid": "k"}) == str(journal.key_path)
    assert json.loads(journal.key_path.read_text()) == {"kty": "RSA", "kid": "k"}
    assert stat.S_IMODE(os.stat(journal.key_path).st_mode) & 0o133 == 0
