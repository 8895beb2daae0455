"""Compact JWS parsing, header policy, encoding and signature checks."""

from __future__ import annotations

import json

import pytest

from fedtoken.core import jose
from fedtoken.core.errors import TokenError
from fedtoken.core.jwk import b64url_encode
from fedtoken.core.model import ASYMMETRIC_ALGORITHMS, Reason
from tests.unit._world import rsa_key, segment, sign

KID = "k1"
GOOD_HEADER = {"alg": "RS256", "typ": "JWT", "kid": KID}
ALL = ASYMMETRIC_ALGORITHMS


def token(header: object = None, payload: object = None, signature: bytes = b"sig") -> str:
    header = GOOD_HEADER if header is None else header
    payload = {"sub": "a"} if payload is None else payload
    return f"{segment(header)}.{segment(payload)}.{b64url_encode(signature)}"


def reason_of(exc: pytest.ExceptionInfo[TokenError]) -> object:
    return exc.value.verdict_reason


# --- parse_compact ---------------------------------------------------------------------


def test_parse_splits_and_decodes() -> None:
    t = token(payload={"sub": "ä", "n": [1, {"x": None}]})
    parsed = jose.parse_compact(t)
    assert parsed.header == GOOD_HEADER
    assert parsed.payload == {"sub": "ä", "n": [1, {"x": None}]}
    assert parsed.payload_bytes == json.dumps(parsed.payload, separators=(",", ":")).encode()
    assert parsed.signing_input == t.rsplit(".", 1)[0].encode()
    assert parsed.signature == b"sig"
    assert jose.parse_compact(t.encode()) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",
        ".b.c",
        "a..c",
        "..",
        "e30.e30.",  # no unsecured JWS
    ],
)
def test_parse_refuses_structure(text: str) -> None:
    with pytest.raises(TokenError) as exc:
        jose.parse_compact(text)
    assert reason_of(exc) is Reason.MALFORMED


def test_empty_objects_parse() -> None:
    assert jose.parse_compact("e30.e30.c2ln").header == {}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t + "=",
        lambda t: t.replace(".", "=.", 1),
        lambda t: " " + t,
        lambda t: t + "\n",
        lambda t: t[:3] + "\t" + t[3:],
        lambda t: t[:3] + "+" + t[3:],
        lambda t: t[:3] + "/" + t[3:],
        lambda t: t[:3] + "é" + t[3:],
        lambda t: t[:3] + "\x00" + t[3:],
    ],
)
def test_parse_refuses_loose_base64(mutate: object) -> None:
    with pytest.raises(TokenError) as exc:
        jose.parse_compact(mutate(token()))  # type: ignore[operator]
    assert reason_of(exc) is Reason.MALFORMED


@pytest.mark.parametrize(
    "header_text",
    [
        b"not json",
        b"[]",
        b'"s"',
        b"1",
        b"null",
        b'{"alg":"RS256","alg":"none"}',
        b'{"a":{"b":1,"b":2}}',
        b'{"a":[{"b":1,"b":2}]}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
        b"\xef\xbb\xbf{}",  # byte-order mark
        '{"a":"é"}'.encode("utf-16"),
        '{"a":"é"}'.encode("latin-1"),
        b'{"a":"\\ud800"}',  # lone surrogate by escape
        b'{"a":"\xed\xa0\x80"}',  # surrogate encoded in UTF-8
        b'{"a":1} x',
        b'{"a":1' + b"0" * 5000 + b"}",  # over the int digit limit
    ],
)
def test_parse_refuses_bad_json(header_text: bytes) -> None:
    with pytest.raises(TokenError) as exc:
        jose.parse_compact(token(header=header_text))
    assert reason_of(exc) is Reason.MALFORMED


def test_valid_surrogate_pair_escape_is_fine() -> None:
    parsed = jose.parse_compact(token(payload=b'{"a":"\\ud83d\\ude00"}'))
    assert parsed.payload == {"a": "\U0001f600"}


def test_depth_bound() -> None:
    ok = "[" * (jose.MAX_JSON_DEPTH - 1) + "]" * (jose.MAX_JSON_DEPTH - 1)
    jose.parse_compact(token(payload='{"a":' + ok + "}"))
    deep = "[" * jose.MAX_JSON_DEPTH + "]" * jose.MAX_JSON_DEPTH
    with pytest.raises(TokenError):
        jose.parse_compact(token(payload='{"a":' + deep + "}"))
    # Brackets inside strings do not count as depth.
    jose.parse_compact(token(payload={"a": "[" * 100, "b": [[{"c": "{" * 50}]]}))


def test_very_deep_json_is_refused_when_the_size_allows_it() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(TokenError) as exc:
        jose.parse_compact(token(header=deep), max_size=10**6)
    assert reason_of(exc) is Reason.MALFORMED
    with pytest.raises(ValueError):
        jose.loads_strict(('{"a":' + deep + "}").encode())


def test_size_is_checked_first() -> None:
    big = token() + "A" * 2_000_000
    with pytest.raises(TokenError) as exc:
        jose.parse_compact(big)
    assert reason_of(exc) is Reason.MALFORMED
    exact = token()
    assert jose.parse_compact(exact, max_size=len(exact))
    with pytest.raises(TokenError):
        jose.parse_compact(exact, max_size=len(exact) - 1)


@pytest.mark.parametrize("value", [None, 1, 1.5, ["a.b.c"], object()])
def test_parse_refuses_non_text(value: object) -> None:
    with pytest.raises(TokenError) as exc:
        jose.parse_compact(value)  # type: ignore[arg-type]
    assert reason_of(exc) is Reason.MALFORMED


# --- b64url_decode_strict ------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"f", b"fo", b"foo", b"foob", bytes(range(256))])
def test_b64url_round_trip(data: bytes) -> None:
    assert jose.b64url_decode_strict(b64url_encode(data).encode()) == data


@pytest.mark.parametrize(
    "text", [b"A", b"AB", b"AAB", b"Zm9=", b"Zm9v=", b"Zm+v", b"Zm/v", b"Zm v"]
)
def test_b64url_refuses(text: bytes) -> None:
    with pytest.raises(ValueError):
        jose.b64url_decode_strict(text)


# --- check_header --------------------------------------------------------------------------


def test_header_ok() -> None:
    assert jose.check_header(GOOD_HEADER, ALL) == ("RS256", KID)
    for typ in ("JWT", "jwt", "at+jwt", "AT+JWT", "application/jwt", "application/at+JWT"):
        assert jose.check_header({**GOOD_HEADER, "typ": typ}, ALL) == ("RS256", KID)
    no_typ = {"alg": "PS512", "kid": KID}
    assert jose.check_header(no_typ, ALL) == ("PS512", KID)
    # Unknown, non-critical members are ignored (RFC 7515 section 4).
    assert jose.check_header({**GOOD_HEADER, "cty": "x", "urn:x": 1}, ALL) == ("RS256", KID)


@pytest.mark.parametrize(
    "alg",
    [
        None,
        "none",
        "None",
        "NONE",
        "nOnE",
        "HS256",
        "HS384",
        "HS512",
        "ES256",
        "EdDSA",
        "rs256",
        "RS256 ",
        "",
        256,
        ["RS256"],
        True,
    ],
)
def test_header_refuses_algorithms(alg: object) -> None:
    header = {**GOOD_HEADER, "alg": alg}
    if alg is None:
        del header["alg"]
    with pytest.raises(TokenError) as exc:
        jose.check_header(header, ALL)
    assert reason_of(exc) is Reason.UNSUPPORTED_ALGORITHM


def test_allowlist_is_the_verifiers_and_never_admits_symmetric() -> None:
    with pytest.raises(TokenError):
        jose.check_header({**GOOD_HEADER, "alg": "PS256"}, frozenset({"RS256"}))
    for alg in ("HS256", "none"):
        with pytest.raises(TokenError) as exc:
            jose.check_header({**GOOD_HEADER, "alg": alg}, frozenset({alg, "RS256"}))
        assert reason_of(exc) is Reason.UNSUPPORTED_ALGORITHM


@pytest.mark.parametrize("member", sorted(jose.FORBIDDEN_HEADER_MEMBERS))
def test_header_refuses_members(member: str) -> None:
    with pytest.raises(TokenError) as exc:
        jose.check_header({**GOOD_HEADER, member: "x"}, ALL)
    assert reason_of(exc) is Reason.UNSUPPORTED_HEADER


@pytest.mark.parametrize("typ", ["JOSE", "jwe", "secevent+jwt", "", 1, None, ["JWT"]])
def test_header_refuses_typ(typ: object) -> None:
    with pytest.raises(TokenError) as exc:
        jose.check_header({**GOOD_HEADER, "typ": typ}, ALL)
    assert reason_of(exc) is Reason.UNSUPPORTED_HEADER


@pytest.mark.parametrize(
    "kid",
    [
        "",
        " ",
        "a b",
        "a\x00",
        "a\n",
        "a\x7f",
        "ké",
        "k" * 257,
        "k" * 20_000,
        1,
        1.0,
        None,
        ["k"],
        {"k": 1},
        True,
    ],
)
def test_header_refuses_kid(kid: object) -> None:
    with pytest.raises(TokenError) as exc:
        jose.check_header({**GOOD_HEADER, "kid": kid}, ALL)
    assert reason_of(exc) is Reason.UNKNOWN_KEY


def test_kid_edges_accepted() -> None:
    for kid in ("!", "~" * 256, "../../etc/passwd", "x'OR'1'='1"):
        assert jose.check_header({**GOOD_HEADER, "kid": kid}, ALL)[1] == kid


def test_missing_kid() -> None:
    with pytest.raises(TokenError) as exc:
        jose.check_header({"alg": "RS256"}, ALL)
    assert reason_of(exc) is Reason.UNKNOWN_KEY


# --- encoding and signatures ---------------------------------------------------------------


def test_encode_and_assemble_round_trip() -> None:
    header = {"alg": "RS256", "kid": KID}
    payload = {"sub": "ä", "n": 1}
    signing_input = jose.encode_signing_input(header, payload)
    # Compact JSON, non-ASCII as UTF-8 rather than \u escapes.
    expected = '{"sub":"ä","n":1}'.encode()
    assert jose.b64url_decode_strict(signing_input.split(b".")[1]) == expected
    assert signing_input.split(b".")[0] == segment(header).encode()
    t = jose.assemble(signing_input, b"\x01\x02")
    parsed = jose.parse_compact(t)
    assert (parsed.header, parsed.payload, parsed.signature) == (header, payload, b"\x01\x02")


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        jose.encode_signing_input({"alg": "RS256"}, {"exp": float("nan")})


@pytest.mark.parametrize("alg", sorted(ASYMMETRIC_ALGORITHMS))
def test_verify_signature_all_algorithms(alg: str) -> None:
    key = rsa_key("jose")
    data = b"header.payload"
    signature = sign(key, alg, data)
    assert jose.verify_signature(alg, key.public_key(), data, signature)
    assert not jose.verify_signature(alg, key.public_key(), data + b"x", signature)
    assert not jose.verify_signature(alg, rsa_key("other").public_key(), data, signature)
    # Same family, other hash; other family, same hash.
    other = {"RS": "PS", "PS": "RS"}[alg[:2]] + alg[2:]
    assert not jose.verify_signature(other, key.public_key(), data, signature)
    sibling = alg[:2] + ("384" if alg[2:] == "256" else "256")
    assert not jose.verify_signature(sibling, key.public_key(), data, signature)


def test_verify_signature_never_raises() -> None:
    key = rsa_key("jose")
    data = b"header.payload"
    good = sign(key, "RS256", data)
    pub = key.public_key()
    assert not jose.verify_signature("RS256", pub, data, good[:-1])
    assert not jose.verify_signature("RS256", pub, data, good + b"\x00")
    assert not jose.verify_signature("RS256", pub, data, b"\x00" + good)
    assert not jose.verify_signature("RS256", pub, data, b"")
    assert not jose.verify_signature("none", pub, data, good)
    assert not jose.verify_signature("HS256", pub, data, good)
    assert not jose.verify_signature("ES256", pub, data, bytes(64))
    assert not jose.verify_signature("RS256", key, data, good)  # private key object
    assert not jose.verify_signature("RS256", b"pem bytes", data, good)
    assert not jose.verify_signature("RS256", None, data, good)
    assert not jose.verify_signature("RS256", pub, "text", good)  # type: ignore[arg-type]
