"""Every row of ../shared/guide/security.md ("Tokens a verifier must reject"),
at the engine level, with the reason the verdict must carry.

Each case builds its token against the shared World (tenant acme with keys in
every state, tenant beta) and expects one Reason. The whole table is also run
as one batch, so a hostile token can never disturb its neighbours.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fedtoken.core.jwk import b64url_encode
from fedtoken.core.model import Expectation, Reason
from tests.unit._world import (
    AUDIENCE,
    ISS_A,
    ISS_B,
    NOW,
    World,
    make_world,
    rsa_key,
    segment,
    sign,
)

Build = Callable[[World], "str | bytes"]


@dataclass(frozen=True)
class Case:
    name: str
    build: Build
    reason: Reason
    expect: Expectation | None = None


CASES: list[Case] = []


def case(name: str, reason: Reason, expect: Expectation | None = None) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES.append(Case(name, build, reason, expect))
        return build

    return register


def raw(header: object, claims: object, signature: bytes | str) -> str:
    """Assemble segments as given: dicts become JSON, str/bytes stay raw text."""
    sig = signature if isinstance(signature, str) else b64url_encode(signature)
    return f"{segment(header)}.{segment(claims)}.{sig}"


def resigned(
    w: World, header: object, claims: object = None, key: str = "a_active", bits: int = 2048
) -> str:
    """A token with an odd header or payload (dicts, or raw JSON text),
    genuinely RS256-signed by ``key``."""
    claims = w.claims() if claims is None else claims
    signing_input = f"{segment(header)}.{segment(claims)}".encode()
    signature = sign(rsa_key(key, bits), "RS256", signing_input)
    return f"{signing_input.decode()}.{b64url_encode(signature)}"


def genuine_signature(w: World) -> str:
    return w.token().split(".")[2]


def modulus_bytes(w: World) -> bytes:
    n = rsa_key("a_active").public_key().public_numbers().n
    return n.to_bytes(256, "big")


# --- positive control -------------------------------------------------------------

case("genuine token", Reason.OK)(lambda w: w.token())

# --- alg none ------------------------------------------------------------------------

for _alg in ("none", "None", "NONE", "nOnE"):
    # There is no unsecured JWS for us: an empty signature is refused by the
    # parser before the header is even read.
    case(f"alg {_alg}, empty signature", Reason.MALFORMED)(
        lambda w, a=_alg: raw(w.header(alg=a), w.claims(), "")
    )
    case(f"alg {_alg}, stale signature", Reason.UNSUPPORTED_ALGORITHM)(
        lambda w, a=_alg: raw(w.header(alg=a), w.claims(), genuine_signature(w))
    )
case("alg missing", Reason.UNSUPPORTED_ALGORITHM)(lambda w: resigned(w, w.header(alg=None)))
case("alg not a string", Reason.UNSUPPORTED_ALGORITHM)(
    lambda w: resigned(w, w.header(alg=["RS256"]))
)
case("alg lower-case rs256", Reason.UNSUPPORTED_ALGORITHM)(
    lambda w: resigned(w, w.header(alg="rs256"))
)

# --- key confusion: HMAC keyed with the public key ---------------------------------------


def _public_secrets() -> dict[str, Callable[[], bytes]]:
    def pub() -> rsa.RSAPublicKey:
        return rsa_key("a_active").public_key()

    def jwk_json() -> bytes:
        numbers = pub().public_numbers()
        from fedtoken.core.jwk import rsa_public_jwk

        return json.dumps(rsa_public_jwk(numbers.n, numbers.e)).encode()

    return {
        "PEM": lambda: pub().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "PKCS1 PEM": lambda: pub().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        ),
        "DER": lambda: pub().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "JWK JSON": jwk_json,
        "raw modulus": lambda: pub().public_numbers().n.to_bytes(256, "big"),
    }


_HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
for _hs, _digest in _HMAC.items():
    for _form, _secret in _public_secrets().items():

        def _confused(
            w: World,
            alg: str = _hs,
            digest: object = _digest,
            secret: Callable[[], bytes] = _secret,
        ) -> str:
            signing_input = f"{segment(w.header(alg=alg))}.{segment(w.claims())}".encode()
            mac = hmac.new(secret(), signing_input, digest).digest()  # type: ignore[arg-type]
            return f"{signing_input.decode()}.{b64url_encode(mac)}"

        case(f"{_hs} keyed with the public key as {_form}", Reason.UNSUPPORTED_ALGORITHM)(_confused)

# --- signature games -------------------------------------------------------------------


def _with_signature(sig: Callable[[World], bytes]) -> Build:
    return lambda w: raw(w.header(), w.claims(), sig(w))


case("signature stripped (trailing dot)", Reason.MALFORMED)(
    lambda w: w.token().rsplit(".", 1)[0] + "."
)
case("signature stripped (no dot)", Reason.MALFORMED)(lambda w: w.token().rsplit(".", 1)[0])
case("empty signature", Reason.MALFORMED)(lambda w: raw(w.header(), w.claims(), ""))
case("all-zero signature", Reason.BAD_SIGNATURE)(_with_signature(lambda w: bytes(256)))
case("signature value 1", Reason.BAD_SIGNATURE)(_with_signature(lambda w: (1).to_bytes(256, "big")))
case("signature equal to the modulus", Reason.BAD_SIGNATURE)(_with_signature(modulus_bytes))
case("signature modulus + 1", Reason.BAD_SIGNATURE)(
    _with_signature(lambda w: (int.from_bytes(modulus_bytes(w), "big") + 1).to_bytes(256, "big"))
)
case("signature of all ones", Reason.BAD_SIGNATURE)(_with_signature(lambda w: b"\xff" * 256))


def _genuine_bytes(w: World) -> bytes:
    from fedtoken.core.jwk import b64url_decode

    return b64url_decode(genuine_signature(w))


case("signature truncated", Reason.BAD_SIGNATURE)(_with_signature(lambda w: _genuine_bytes(w)[:-1]))
case("signature extended with a zero", Reason.BAD_SIGNATURE)(
    _with_signature(lambda w: _genuine_bytes(w) + b"\x00")
)
case("signature with a leading zero", Reason.BAD_SIGNATURE)(
    _with_signature(lambda w: b"\x00" + _genuine_bytes(w))
)
case("signature doubled", Reason.BAD_SIGNATURE)(_with_signature(lambda w: _genuine_bytes(w) * 2))
case("genuine signature moved onto a changed payload", Reason.BAD_SIGNATURE)(
    lambda w: raw(w.header(), w.claims(sub="mallory"), genuine_signature(w))
)
case("genuine signature moved onto a changed header", Reason.BAD_SIGNATURE)(
    lambda w: raw(w.header(typ="at+jwt"), w.claims(), genuine_signature(w))
)

# --- foreign key -------------------------------------------------------------------------

case("signed by a key never published, under a real kid", Reason.BAD_SIGNATURE)(
    lambda w: w.token(sign_with="attacker")
)
case("signed by tenant beta's key, under acme's kid", Reason.BAD_SIGNATURE)(
    lambda w: w.token(sign_with="b_active")
)
case("signed by a 4096-bit foreign key", Reason.BAD_SIGNATURE)(
    lambda w: resigned(w, w.header(), key="attacker", bits=4096)
)

# --- algorithm mismatch ------------------------------------------------------------------

case("PS256 signature under an RS256 header", Reason.BAD_SIGNATURE)(
    lambda w: w.token(sign_alg="PS256")
)
case("RS256 signature under a PS256 header (RS256 key)", Reason.UNSUPPORTED_ALGORITHM)(
    lambda w: w.token(header=w.header(alg="PS256"), sign_alg="RS256")
)
case("PS256 signature under a PS256 header on an RS256 key", Reason.UNSUPPORTED_ALGORITHM)(
    lambda w: w.token(header=w.header(alg="PS256"))
)
case("RS256 header on a PS256 key", Reason.UNSUPPORTED_ALGORITHM)(
    lambda w: w.token("a_ps256", header=w.header("a_ps256", alg="RS256"))
)
case("RS512 header on an RS256 key", Reason.UNSUPPORTED_ALGORITHM)(
    lambda w: w.token(header=w.header(alg="RS512"))
)
case("ES256 under an RSA kid", Reason.UNSUPPORTED_ALGORITHM)(
    lambda w: raw(w.header(alg="ES256"), w.claims(), b"\x01" * 64)
)
case("ES256 with r = s = 0 (CVE-2022-21449)", Reason.UNSUPPORTED_ALGORITHM)(
    lambda w: raw(w.header(alg="ES256"), w.claims(), bytes(64))
)

# --- header-carried keys -------------------------------------------------------------------


def _attacker_jwk() -> dict[str, object]:
    from fedtoken.core.jwk import rsa_public_jwk

    numbers = rsa_key("attacker").public_key().public_numbers()
    return rsa_public_jwk(numbers.n, numbers.e)


_CARRIERS: dict[str, Callable[[], object]] = {
    "jwk": _attacker_jwk,
    "jku": lambda: "https://evil.example/jwks.json",
    "x5u": lambda: "https://evil.example/cert.pem",
    "x5c": lambda: ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"],
    "x5t": lambda: "dGh1bWJwcmludA",
    "x5t#S256": lambda: "dGh1bWJwcmludA",
}
for _member, _value in _CARRIERS.items():
    case(f"header carries {_member}, signed by the attacker", Reason.UNSUPPORTED_HEADER)(
        lambda w, m=_member, v=_value: resigned(w, w.header(**{m: v()}), key="attacker")
    )
    case(f"header carries {_member}, genuinely signed", Reason.UNSUPPORTED_HEADER)(
        lambda w, m=_member, v=_value: resigned(w, w.header(**{m: v()}))
    )

# --- kid injection ---------------------------------------------------------------------------

for _label, _kid in {
    "path traversal": "../../../../etc/passwd",
    "absolute path": "/dev/null",
    "SQL fragment": "x' UNION SELECT 'AAAA' --",
    "SQL without spaces": "x'OR'1'='1",
    "NUL byte": "kid\x00",
    "newline": "kid\nadmin",
    "non-ASCII": "kïd",
    "257 characters": "k" * 257,
    "empty": "",
    "real kid with a trailing space": None,
    "real kid in lower case": None,
}.items():

    def _inject(w: World, label: str = _label, kid: str | None = _kid) -> str:
        if kid is None:
            real = w.kids["a_active"]
            kid = real + " " if "space" in label else real.lower()
        return resigned(w, w.header(kid=kid))

    case(f"kid injection: {_label}", Reason.UNKNOWN_KEY)(_inject)

for _label, _kid_value in {
    "numeric": 123,
    "null": None,
    "list": ["a"],
    "object": {"a": 1},
    "boolean": True,
}.items():
    case(f"kid not a string: {_label}", Reason.UNKNOWN_KEY)(
        lambda w, k=_kid_value: resigned(w, {"alg": "RS256", "typ": "JWT", "kid": k})
    )
case("kid missing", Reason.UNKNOWN_KEY)(lambda w: resigned(w, w.header(kid=None)))
# A 20 kB kid makes the token larger than the 16 kB bound, so the size check
# refuses it before anything is decoded (test_jose checks the kid rule alone).
case("kid of 20 kB", Reason.MALFORMED)(lambda w: resigned(w, w.header(kid="k" * 20_000)))

# --- critical extensions -------------------------------------------------------------------------

case("crit naming an unknown member", Reason.UNSUPPORTED_HEADER)(
    lambda w: resigned(w, w.header(crit=["urn:example:x"], **{"urn:example:x": 1}))
)
case("crit empty", Reason.UNSUPPORTED_HEADER)(lambda w: resigned(w, w.header(crit=[])))
case("b64 false (RFC 7797)", Reason.UNSUPPORTED_HEADER)(
    lambda w: resigned(w, w.header(b64=False, crit=["b64"]))
)
case("b64 false without crit", Reason.UNSUPPORTED_HEADER)(
    lambda w: resigned(w, w.header(b64=False))
)
case("zip (compressed payload)", Reason.UNSUPPORTED_HEADER)(
    lambda w: resigned(w, w.header(zip="DEF"))
)
case("typ of another kind", Reason.UNSUPPORTED_HEADER)(
    lambda w: resigned(w, w.header(typ="secevent+jwt"))
)

# --- structure ---------------------------------------------------------------------------------


def _swap_segment(index: int, text: str) -> Build:
    def build(w: World) -> str:
        parts = w.token().split(".")
        parts[index] = text
        return ".".join(parts)

    return build


case("JWE (5 parts)", Reason.MALFORMED)(
    lambda w: ".".join([segment({"alg": "RSA-OAEP", "enc": "A256GCM"}), "a", "b", "c", "d"])
)
case("2 parts", Reason.MALFORMED)(lambda w: ".".join(w.token().split(".")[:2]))
case("4 parts", Reason.MALFORMED)(lambda w: w.token() + ".AAAA")
case("empty header segment", Reason.MALFORMED)(_swap_segment(0, ""))
case("empty payload segment", Reason.MALFORMED)(_swap_segment(1, ""))
case("only dots", Reason.MALFORMED)(lambda w: "..")
case("empty token", Reason.MALFORMED)(lambda w: "")
case("header not JSON", Reason.MALFORMED)(_swap_segment(0, segment("alg=RS256")))
case("payload not JSON", Reason.MALFORMED)(_swap_segment(1, segment("sub=alice")))
case("header a JSON array", Reason.MALFORMED)(_swap_segment(0, segment('["RS256"]')))
case("header a JSON string", Reason.MALFORMED)(_swap_segment(0, segment('"RS256"')))
case("payload a JSON number", Reason.MALFORMED)(_swap_segment(1, segment("1")))
case("payload null", Reason.MALFORMED)(_swap_segment(1, segment("null")))
case("header not UTF-8", Reason.MALFORMED)(_swap_segment(0, segment(b'{"alg":"RS256\xff"}')))
case("header with a byte-order mark", Reason.MALFORMED)(
    lambda w: resigned(w, "\ufeff" + json.dumps(w.header()))
)
case("payload in UTF-16", Reason.MALFORMED)(
    _swap_segment(1, segment(json.dumps({"sub": "alice"}).encode("utf-16")))
)
case("payload with NaN", Reason.MALFORMED)(_swap_segment(1, segment('{"exp":NaN}')))
case("payload with Infinity", Reason.MALFORMED)(_swap_segment(1, segment('{"exp":Infinity}')))
case("payload with a lone surrogate", Reason.MALFORMED)(
    lambda w: resigned(w, w.header(), json.dumps(w.claims())[:-1] + ',"x":"\\ud800"}')
)


def _padded_header(w: World) -> str:
    # Grow the header until its base64url needs padding, then pad it.
    for extra in range(3):
        header = w.header(x="x" * extra)
        if len(segment(header)) % 4:
            first, rest = resigned(w, header).split(".", 1)
            return first + "=" * (-len(first) % 4) + "." + rest
    raise AssertionError("unreachable: three lengths cover every residue")


case("padded base64 in the header", Reason.MALFORMED)(_padded_header)
case("padded base64 in the signature", Reason.MALFORMED)(lambda w: w.token() + "==")


def _standard_alphabet(w: World) -> str:
    # ">>>" and "???" encode as "Pj4-" and "Pz8_", so the payload holds both.
    token = w.token(claims=w.claims(x=">>>???"))
    assert "-" in token and "_" in token
    return token.replace("-", "+").replace("_", "/")


def _non_canonical(w: World) -> str:
    # 256 signature bytes take 342 characters whose last 4 bits are unused:
    # the last character is one of A, Q, g, w; its successor decodes alike.
    token = w.token()
    return token[:-1] + {"A": "B", "Q": "R", "g": "h", "w": "x"}[token[-1]]


case("standard alphabet (+/)", Reason.MALFORMED)(_standard_alphabet)
case("non-canonical trailing bits", Reason.MALFORMED)(_non_canonical)
case("whitespace inside a segment", Reason.MALFORMED)(
    lambda w: w.token()[:10] + " " + w.token()[10:]
)
case("newline inside a segment", Reason.MALFORMED)(lambda w: w.token()[:10] + "\n" + w.token()[10:])
case("leading whitespace", Reason.MALFORMED)(lambda w: " " + w.token())
case("trailing newline", Reason.MALFORMED)(lambda w: w.token() + "\n")
case("non-ASCII character", Reason.MALFORMED)(lambda w: w.token()[:10] + "é" + w.token()[10:])
case("duplicate alg in header", Reason.MALFORMED)(
    lambda w: resigned(w, '{"alg":"RS256","alg":"none","kid":"' + w.kids["a_active"] + '"}')
)
case("duplicate kid in header", Reason.MALFORMED)(
    lambda w: resigned(w, '{"alg":"RS256","kid":"' + w.kids["a_active"] + '","kid":"other"}')
)
case("duplicate claim in payload", Reason.MALFORMED)(
    lambda w: resigned(w, w.header(), json.dumps(w.claims())[:-1] + ',"sub":"admin"}')
)
case("duplicate member in a nested object", Reason.MALFORMED)(
    lambda w: resigned(w, w.header(), json.dumps(w.claims())[:-1] + ',"cnf":{"a":1,"a":2}}')
)

# --- size and depth ------------------------------------------------------------------------

case("2 MB token", Reason.MALFORMED)(lambda w: w.token() + "A" * 2_000_000)
case("2 MB of dots", Reason.MALFORMED)(lambda w: "." * 2_000_000)
case("header nested 100,000 deep", Reason.MALFORMED)(
    lambda w: raw("[" * 100_000 + "]" * 100_000, w.claims(), genuine_signature(w))
)
case("payload nested 40 deep (over the bound)", Reason.MALFORMED)(
    lambda w: resigned(w, w.header(), w.claims(deep=_nested(40)))
)
case("payload nested 30 deep (under the bound)", Reason.OK)(
    lambda w: resigned(w, w.header(), w.claims(deep=_nested(30)))
)


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth - 1):  # the claims object itself is one level
        value = [value]
    return value


# --- claims --------------------------------------------------------------------------------

case("expired", Reason.EXPIRED)(lambda w: w.token(claims=w.claims(exp=NOW - 3600)))
case("expired exactly at the leeway", Reason.EXPIRED)(
    lambda w: w.token(claims=w.claims(exp=NOW - 30))
)
case("not yet valid", Reason.NOT_YET_VALID)(lambda w: w.token(claims=w.claims(nbf=NOW + 3600)))
case("iat in the future beyond leeway", Reason.ISSUED_IN_FUTURE)(
    lambda w: w.token(claims=w.claims(iat=NOW + 3600, nbf=None))
)
case("iat in the future within leeway", Reason.OK)(
    lambda w: w.token(claims=w.claims(iat=NOW + 20, nbf=None))
)
case("iss of no tenant", Reason.UNTRUSTED_ISSUER)(
    lambda w: w.token(claims=w.claims(iss="https://evil.example"))
)
case(
    "iss differing from the expected issuer",
    Reason.ISSUER_MISMATCH,
    Expectation(AUDIENCE, issuer=ISS_B),
)(lambda w: w.token())
case("iss with a trailing slash", Reason.UNTRUSTED_ISSUER)(
    lambda w: w.token(claims=w.claims(iss=ISS_A + "/"))
)
case("iss not a string", Reason.INVALID_CLAIM)(lambda w: w.token(claims=w.claims(iss=["x"])))
case("wrong aud (string)", Reason.AUDIENCE_MISMATCH)(
    lambda w: w.token(claims=w.claims(aud="api://billing"))
)
case("wrong aud (list)", Reason.AUDIENCE_MISMATCH)(
    lambda w: w.token(claims=w.claims(aud=["api://billing", "api://hr"]))
)
case("aud list containing ours", Reason.OK)(
    lambda w: w.token(claims=w.claims(aud=["api://billing", AUDIENCE]))
)
case("aud missing while one is expected", Reason.AUDIENCE_MISMATCH)(
    lambda w: w.token(claims=w.claims(aud=None))
)
case("aud as a prefix of ours", Reason.AUDIENCE_MISMATCH)(
    lambda w: w.token(claims=w.claims(aud=AUDIENCE[:-1]))
)
for _claim in ("iss", "sub", "exp", "iat", "jti"):
    case(f"missing {_claim}", Reason.MISSING_CLAIM)(
        lambda w, c=_claim: w.token(claims=w.claims(**{c: None}))
    )


def _time_claim(claim: str, value: object) -> Build:
    # JSON null must be written explicitly: World.claims() drops None.
    return lambda w: resigned(w, w.header(), {**w.claims(), claim: value})


for _claim in ("exp", "nbf", "iat"):
    for _label, _value in {
        "string": "1900000000",
        "float as string": "1.9e9",
        "float": float(NOW),
        "float with no fraction": 1.9e9,
        "huge": 10**20,
        "beyond year 9999": 253402300800,
        "negative": -1,
        "boolean": True,
        "null": None,
        "object": {"t": NOW},
    }.items():
        case(f"{_claim} as {_label}", Reason.INVALID_CLAIM)(_time_claim(_claim, _value))
case("sub empty", Reason.INVALID_CLAIM)(lambda w: w.token(claims=w.claims(sub="")))
case("jti a number", Reason.INVALID_CLAIM)(lambda w: w.token(claims=w.claims(jti=7)))

# --- tenancy -----------------------------------------------------------------------------------

case("kid of tenant acme under iss of tenant beta", Reason.TENANT_MISMATCH)(
    lambda w: w.token(claims=w.claims(iss=ISS_B))
)
case("kid of tenant beta under iss of tenant acme", Reason.TENANT_MISMATCH)(
    lambda w: w.token("b_active")
)
case("withdrawn kid of acme under iss of beta", Reason.TENANT_MISMATCH)(
    lambda w: w.token("a_retired", claims=w.claims(iss=ISS_B))
)
case(
    "token of acme when tenant beta is expected",
    Reason.TENANT_MISMATCH,
    Expectation(AUDIENCE, tenant="beta"),
)(lambda w: w.token())
case("unknown kid", Reason.UNKNOWN_KEY)(lambda w: resigned(w, w.header(kid="no-such-key")))

# --- key state ---------------------------------------------------------------------------------

case("signed by a retired key", Reason.KEY_INACTIVE)(lambda w: w.token("a_retired"))
case("signed by a destroyed key", Reason.KEY_INACTIVE)(lambda w: w.token("a_destroyed"))
case("signed by a compromised key", Reason.KEY_REVOKED)(lambda w: w.token("a_compromised"))
case("signed by a compromised, then destroyed key", Reason.KEY_REVOKED)(
    lambda w: w.token("a_burnt")
)
case("revoked jti", Reason.REVOKED)(lambda w: w.token(claims=w.claims(jti="revoked-jti")))
case("revoked subject", Reason.REVOKED)(lambda w: w.token(claims=w.claims(sub="revoked-subject")))
case("jti revoked in another tenant only", Reason.OK)(
    lambda w: w.token("b_active", claims=w.claims(iss=ISS_B, jti="revoked-jti", sub="bob"))
)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_attack(world: World, c: Case) -> None:
    verdict = world.verify(c.build(world), c.expect)
    assert verdict.reason is c.reason
    assert verdict.valid is (c.reason is Reason.OK)
    if not verdict.valid:
        assert verdict.claims is None and verdict.claims_json == b""


async def test_whole_table_as_one_batch(world: World) -> None:
    plain = [c for c in CASES if c.expect is None]
    tokens = [c.build(world) for c in plain]
    verdicts = await world.engine.verify_batch(tokens, world.expect)  # type: ignore[arg-type]
    assert [v.reason for v in verdicts] == [c.reason for c in plain]


def test_revocation_view_can_revoke_a_key(world: World) -> None:
    world.revocations.kids.add(world.kids["a_retiring"])
    try:
        assert world.verify(world.token("a_retiring")).reason is Reason.KEY_REVOKED
    finally:
        world.revocations.kids.discard(world.kids["a_retiring"])


def test_stale_revocation_view_fails_closed() -> None:
    w = make_world()
    w.revocations.stale = True
    assert w.verify(w.token()).reason is Reason.REVOCATION_UNAVAILABLE
    # Earlier failures still name their own reason.
    assert w.verify(w.token(sign_with="attacker")).reason is Reason.BAD_SIGNATURE


def test_depth_is_refused_by_the_parser_not_only_by_size() -> None:
    w = make_world(max_token_size=1_000_000)
    token = raw("[" * 100_000 + "]" * 100_000, w.claims(), genuine_signature(w))
    assert w.verify(token).reason is Reason.MALFORMED
