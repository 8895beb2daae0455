"""Rendering our JWKS and admitting a federated issuer's."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from fedtoken.core.errors import PolicyViolation
from fedtoken.core.jwks import etag, parse_trusted_jwks, render_jwks
from fedtoken.core.model import KeyState
from tests.unit._world import record, rsa_key


def test_render_published_only_sorted_and_public() -> None:
    records = [
        record("j_active", "t2", KeyState.ACTIVE),
        record("j_pending", "t1", KeyState.PENDING),
        record("j_retiring", "t1", KeyState.RETIRING, alg="PS256"),
        record("j_retired", "t1", KeyState.RETIRED),
        record("j_destroyed", "t1", KeyState.DESTROYED),
        record("j_compromised", "t1", KeyState.COMPROMISED),
    ]
    # A corrupted record carrying private material must not leak it.
    records[0] = replace(records[0], public_jwk={**records[0].public_jwk, "d": "secret"})
    body = render_jwks(records)
    doc = json.loads(body)
    published = sorted((r for r in records if r.state.published), key=lambda r: (r.tenant, r.kid))
    assert [k["kid"] for k in doc["keys"]] == [r.kid for r in published]
    for entry, rec in zip(doc["keys"], published, strict=True):
        assert set(entry) == {"kty", "use", "alg", "kid", "n", "e"}
        assert entry["alg"] == rec.alg and entry["n"] == rec.public_jwk["n"]
    assert b"secret" not in body
    assert b" " not in body  # compact
    assert render_jwks(reversed(records)) == body  # deterministic
    assert render_jwks([]) == b'{"keys":[]}'


def test_etag() -> None:
    a, b = etag(b"{}"), etag(b"{} ")
    assert a.startswith('"') and a.endswith('"') and not a.startswith("W/")
    assert a != b and etag(b"{}") == a
    assert len(a) == 45  # quotes around 43 base64url characters of SHA-256


def jwk(name: str, **overrides: Any) -> dict[str, Any]:
    value = dict(record(name, "fed", KeyState.ACTIVE).public_jwk)
    value.update(overrides)
    return {k: v for k, v in value.items() if v is not None}


def doc(*keys: object) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def test_parse_trusted_jwks() -> None:
    good, other = jwk("f1"), jwk("f2", alg=None, use=None)
    trusted = parse_trusted_jwks(doc(good, other))
    assert set(trusted) == {good["kid"], other["kid"]}
    assert trusted[good["kid"]].public_numbers() == rsa_key("f1").public_key().public_numbers()


def test_skips_unusable_keys() -> None:
    good = jwk("f1")
    skipped = [
        {"kty": "EC", "crv": "P-256", "kid": "ec", "x": "AA", "y": "AA"},
        jwk("f2", use="enc"),
        jwk("f3", alg="RSA-OAEP"),
        jwk("f4", kid=None),
        jwk("f5", kid="a b"),
        jwk("f6", kid=7),
        jwk("f7", e="AQAB="),
        {"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AA"},
    ]
    assert set(parse_trusted_jwks(doc(*skipped, good))) == {good["kid"]}


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_private_material_refuses_the_whole_set(member: str) -> None:
    leaking = jwk("f2", **{member: "AQAB"})
    with pytest.raises(PolicyViolation):
        parse_trusted_jwks(doc(jwk("f1"), leaking))
    # Even on a key type we would have skipped.
    with pytest.raises(PolicyViolation):
        parse_trusted_jwks(doc(jwk("f1"), {"kty": "EC", "kid": "x", member: "AA"}))


def test_duplicate_kids_refuse_the_whole_set() -> None:
    a = jwk("f1")
    b = jwk("f2", kid=a["kid"])
    with pytest.raises(PolicyViolation):
        parse_trusted_jwks(doc(a, b))
    with pytest.raises(PolicyViolation):
        parse_trusted_jwks(doc(a, {"kty": "EC", "kid": a["kid"]}))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"keys":{}}',
        b'{"nokeys":[]}',
        b'{"keys":[1]}',
        b'{"keys":[],"keys":[]}',
        b'{"keys":[{"kty":"RSA","kty":"EC"}]}',
        b'{"keys":[],"x":NaN}',
        b"\xff\xfe{}",
    ],
)
def test_malformed_documents(body: bytes) -> None:
    with pytest.raises(PolicyViolation):
        parse_trusted_jwks(body)


def test_size_bound() -> None:
    body = doc(jwk("f1"))
    assert parse_trusted_jwks(body, max_bytes=len(body))
    with pytest.raises(PolicyViolation):
        parse_trusted_jwks(body, max_bytes=len(body) - 1)
    with pytest.raises(PolicyViolation):
        parse_trusted_jwks(b" " * 65537)


def test_empty_set() -> None:
    assert parse_trusted_jwks(b'{"keys":[]}') == {}


@pytest.mark.parametrize("alg", [["RS256"], {"v": "RS256"}, 256, None])
def test_a_non_string_alg_is_a_refusal_not_an_error(alg: object) -> None:
    """A JWK member of the wrong JSON type (an unhashable list, say) makes the
    key unusable; it must never escape as a TypeError (INTERNAL)."""
    from fedtoken.core.errors import PolicyViolation
    from fedtoken.core.keys import load_rsa_public_key

    body = json.dumps({"keys": [{"kty": "RSA", "alg": alg, "kid": "k", "n": "AQAB",
                                 "e": "AQAB"}]}).encode()
    assert parse_trusted_jwks(body) == {}
    with pytest.raises(PolicyViolation):
        load_rsa_public_key({"kty": "RSA", "alg": alg, "n": "AQAB", "e": "AQAB"})
