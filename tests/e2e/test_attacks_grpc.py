"""The attack table of the project's security guide, through the gRPC API of a
real server (SoftHSM keys, Postgres). Forgeries that need a valid signature
over hostile content are signed with the tenant's real HSM key, as an insider
with signing access could. Every case must be rejected with its reason, one
by one (unary Verify) and all together (one VerifyBatch), and the server must
keep answering afterwards. The engine-level table (tests/unit/test_attacks.py)
covers the same classes in more variants.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from fedtoken.core.jwk import b64url_decode, b64url_encode
from fedtoken_client import FedtokenClient, reason_name
from tests.support import ServerThread

AUD = "svc-attack"


def seg(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return b64url_encode(raw)


@dataclass
class World:
    tenant: str
    issuer: str
    other_issuer: str
    kid: str
    label: str
    genuine: str
    header: dict[str, Any]
    payload: dict[str, Any]
    pem: bytes
    der: bytes
    jwk_json: bytes
    modulus: bytes
    sign: Callable[[bytes], bytes]

    def forge(self, header: dict[str, Any] | bytes | None = None,
              payload: dict[str, Any] | bytes | None = None, **claims: Any) -> str:
        """A token with hostile content and a genuine HSM signature."""
        body: Any = payload if payload is not None else {**self.payload, **claims}
        for k, v in list(claims.items()):
            if v is DROP:
                body.pop(k)
        si = f"{seg(header if header is not None else self.header)}.{seg(body)}".encode()
        return f"{si.decode()}.{b64url_encode(self.sign(si))}"


DROP = object()


@pytest.fixture(scope="module")
def world(client: FedtokenClient, server: ServerThread) -> World:
    assert server.app is not None
    hsm = server.app.signer
    tid, other = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    t = client.create_tenant(tid)
    o = client.create_tenant(other)
    issued = client.issue("eve", AUD, tenant=tid, lifetime_seconds=600)
    key = next(k for k in client.list_keys(tid) if k.kid == issued.kid)
    jwk = json.loads(key.public_jwk_json)
    pub = rsa.RSAPublicNumbers(int.from_bytes(b64url_decode(jwk["e"]), "big"),
                               int.from_bytes(b64url_decode(jwk["n"]), "big")).public_key()
    h, p, _ = issued.token.split(".")
    return World(
        tenant=tid, issuer=t.issuer, other_issuer=o.issuer, kid=issued.kid,
        label=key.hsm_label, genuine=issued.token,
        header=json.loads(b64url_decode(h)), payload=json.loads(b64url_decode(p)),
        pem=pub.public_bytes(serialization.Encoding.PEM,
                             serialization.PublicFormat.SubjectPublicKeyInfo),
        der=pub.public_bytes(serialization.Encoding.DER,
                             serialization.PublicFormat.SubjectPublicKeyInfo),
        jwk_json=key.public_jwk_json.encode(), modulus=b64url_decode(jwk["n"]),
        sign=lambda si: hsm.sign_many(key.hsm_label, key.kid, [si])[0],
    )


def hs(w: World, alg: str, secret: bytes) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    si = f"{seg({**w.header, 'alg': alg})}.{seg(w.payload)}".encode()
    return f"{si.decode()}.{b64url_encode(hmac.new(secret, si, digest).digest())}"


def foreign_rsa(w: World) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    si = f"{seg(w.header)}.{seg(w.payload)}".encode()
    return f"{si.decode()}.{b64url_encode(key.sign(si, padding.PKCS1v15(), hashes.SHA256()))}"


def ecdsa(w: World, zero: bool) -> str:
    si = f"{seg({**w.header, 'alg': 'ES256'})}.{seg(w.payload)}".encode()
    if zero:
        sig = b"\x00" * 64
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        r, s = decode_dss_signature(key.sign(si, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{si.decode()}.{b64url_encode(sig)}"


def parts(w: World) -> tuple[str, str, str]:
    h, p, s = w.genuine.split(".")
    return h, p, s


def sig_bytes(w: World) -> bytes:
    return b64url_decode(parts(w)[2])


def with_sig(w: World, sig: bytes) -> str:
    h, p, _ = parts(w)
    return f"{h}.{p}.{b64url_encode(sig)}"


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


now = int(time.time())

# (case name, builder, expected reason)
CASES: list[tuple[str, Callable[[World], str], str]] = [
    # alg none / missing
    ("alg none, empty signature",
     lambda w: f"{seg({**w.header, 'alg': 'none'})}.{parts(w)[1]}.", "MALFORMED"),
    *[(f"alg {a}, stale signature",
       lambda w, a=a: f"{seg({**w.header, 'alg': a})}.{parts(w)[1]}.{parts(w)[2]}",
       "UNSUPPORTED_ALGORITHM") for a in ("none", "None", "NONE", "nOnE")],
    ("alg missing", lambda w: w.forge({"typ": "JWT", "kid": w.kid}), "UNSUPPORTED_ALGORITHM"),
    # key confusion: HMAC keyed with the public key in every encoding
    *[(f"{alg} keyed with public key as {name}", lambda w, alg=alg, name=name: hs(
        w, alg, {"PEM": w.pem, "DER": w.der, "JWK": w.jwk_json, "modulus": w.modulus}[name]),
       "UNSUPPORTED_ALGORITHM")
      for alg in ("HS256", "HS384", "HS512") for name in ("PEM", "DER", "JWK", "modulus")],
    # signature games
    ("signature stripped", lambda w: ".".join(parts(w)[:2]) + ".", "MALFORMED"),
    ("signature all zero", lambda w: with_sig(w, b"\x00" * 256), "BAD_SIGNATURE"),
    ("signature value 1", lambda w: with_sig(w, (1).to_bytes(256, "big")), "BAD_SIGNATURE"),
    ("signature = modulus", lambda w: with_sig(w, w.modulus), "BAD_SIGNATURE"),
    ("signature truncated", lambda w: with_sig(w, sig_bytes(w)[:-1]), "BAD_SIGNATURE"),
    ("signature extended", lambda w: with_sig(w, sig_bytes(w) + b"\x00"), "BAD_SIGNATURE"),
    ("genuine signature on a changed payload",
     lambda w: f"{parts(w)[0]}.{seg({**w.payload, 'sub': 'admin'})}.{parts(w)[2]}",
     "BAD_SIGNATURE"),
    ("foreign key under a real kid", foreign_rsa, "BAD_SIGNATURE"),
    # algorithm mismatch
    ("PS256 header on an RS256 signature",
     lambda w: f"{seg({**w.header, 'alg': 'PS256'})}.{parts(w)[1]}.{parts(w)[2]}",
     "UNSUPPORTED_ALGORITHM"),
    ("ES256 under an RSA kid", lambda w: ecdsa(w, zero=False), "UNSUPPORTED_ALGORITHM"),
    ("ECDSA r = s = 0", lambda w: ecdsa(w, zero=True), "UNSUPPORTED_ALGORITHM"),
    # header-carried keys and critical extensions (genuinely signed)
    *[(f"header member {m}", lambda w, m=m, v=v: w.forge({**w.header, m: v}),
       "UNSUPPORTED_HEADER")
      for m, v in (("jwk", {"kty": "RSA", "n": "AQAB", "e": "AQAB"}),
                   ("jku", "https://evil.example/jwks.json"),
                   ("x5u", "https://evil.example/cert.pem"), ("x5c", ["MIIB"]),
                   ("crit", ["exp"]), ("b64", False))],
    # kid injection (genuinely signed)
    *[(f"kid {name}", lambda w, kid=kid: w.forge({**w.header, "kid": kid}), "UNKNOWN_KEY")
      for name, kid in (("path traversal", "../../../../etc/passwd"),
                        ("SQL fragment", "x' OR '1'='1' --"), ("NUL byte", "a\u0000b"),
                        ("300 characters", "k" * 300), ("number", 12345), ("null", None),
                        ("list", [1]))],
    # A 20 kB kid makes the token larger than max_token_bytes: refused unparsed.
    ("kid 20 kB", lambda w: w.forge({**w.header, "kid": "k" * 20_000}), "MALFORMED"),
    # structure
    ("JWE, 5 parts", lambda w: w.genuine + ".AAAA.BBBB", "MALFORMED"),
    ("2 parts", lambda w: ".".join(parts(w)[:2]), "MALFORMED"),
    ("4 parts", lambda w: w.genuine + ".AAAA", "MALFORMED"),
    ("empty header segment", lambda w: "." + ".".join(parts(w)[1:]), "MALFORMED"),
    ("empty payload segment", lambda w: f"{parts(w)[0]}..{parts(w)[2]}", "MALFORMED"),
    ("non-JSON header", lambda w: w.forge(b"not json"), "MALFORMED"),
    ("array header", lambda w: w.forge([w.header]), "MALFORMED"),  # type: ignore[arg-type]
    ("non-object payload", lambda w: w.forge(payload=b'"a string"'), "MALFORMED"),
    ("padded base64", lambda w: parts(w)[0] + "==." + ".".join(parts(w)[1:]), "MALFORMED"),
    ("standard alphabet", lambda w: w.genuine.replace("-", "+").replace("_", "/")
     if ("-" in w.genuine or "_" in w.genuine) else w.genuine[:-2] + "+/", "MALFORMED"),
    ("whitespace", lambda w: w.genuine[:10] + " " + w.genuine[10:], "MALFORMED"),
    ("trailing newline", lambda w: w.genuine + "\n", "MALFORMED"),
    ("duplicate header members", lambda w: w.forge(
        f'{{"alg":"RS256","kid":"{w.kid}","alg":"none"}}'.encode()), "MALFORMED"),
    ("duplicate payload members", lambda w: w.forge(payload=json.dumps(w.payload)[:-1].encode()
                                                    + b',"sub":"admin"}'), "MALFORMED"),
    # size and depth
    ("2 MB token", lambda w: w.genuine + "A" * (2 * 1024 * 1024), "MALFORMED"),
    ("100,000-deep JSON", lambda w: f"{seg(deep(100_000))}.{parts(w)[1]}.{parts(w)[2]}",
     "MALFORMED"),
    ("5,000-deep JSON payload, genuinely signed", lambda w: w.forge(payload=deep(5000)),
     "MALFORMED"),
    # claims (genuinely signed)
    ("expired", lambda w: w.forge(exp=now - 3600, iat=now - 7200, nbf=now - 7200), "EXPIRED"),
    ("not yet valid", lambda w: w.forge(nbf=now + 3600), "NOT_YET_VALID"),
    ("issued in the future", lambda w: w.forge(iat=now + 3600), "ISSUED_IN_FUTURE"),
    ("wrong audience string", lambda w: w.forge(aud="svc-other"), "AUDIENCE_MISMATCH"),
    ("wrong audience list", lambda w: w.forge(aud=["a", "b"]), "AUDIENCE_MISMATCH"),
    ("untrusted issuer", lambda w: w.forge(iss="https://evil.example"), "UNTRUSTED_ISSUER"),
    *[(f"missing {c}", lambda w, c=c: w.forge(**{c: DROP}),
       "MISSING_CLAIM")
      for c in ("iss", "sub", "exp", "iat", "jti")],
    *[(f"exp as {name}", lambda w, v=v: w.forge(exp=v), "INVALID_CLAIM")
      for name, v in (("string", str(now + 600)), ("float as string", f"{now + 600}.0"),
                      ("float", now + 600.5), ("huge number", 10**30), ("boolean", True),
                      ("negative", -1))],
    ("nbf as boolean", lambda w: w.forge(nbf=False), "INVALID_CLAIM"),
    ("iat as string", lambda w: w.forge(iat=str(now)), "INVALID_CLAIM"),
    # tenancy: this tenant's key, another tenant's issuer
    ("kid of tenant A, iss of tenant B", lambda w: w.forge(iss=w.other_issuer),
     "TENANT_MISMATCH"),
]


@pytest.fixture(scope="module")
def tokens(world: World) -> list[tuple[str, str, str]]:
    return [(name, build(world), reason) for name, build, reason in CASES]


def test_every_attack_is_rejected_with_its_reason_one_by_one(
    client: FedtokenClient, tokens: list[tuple[str, str, str]]
) -> None:
    wrong = []
    for name, token, reason in tokens:
        verdict = client.verify(token, AUD)
        if verdict.valid or reason_name(verdict.reason) != reason:
            wrong.append((name, verdict.valid, reason_name(verdict.reason), reason))
    assert not wrong, wrong


def test_the_whole_table_in_one_batch_answers_in_order(
    client: FedtokenClient, world: World, tokens: list[tuple[str, str, str]]
) -> None:
    batch = [world.genuine] + [t for _, t, _ in tokens] + [world.genuine]
    verdicts = client.verify_batch(batch, AUD)
    got = [reason_name(v.reason) for v in verdicts]
    assert got == ["OK"] + [r for _, _, r in tokens] + ["OK"]
    assert [v.valid for v in verdicts] == [True] + [False] * len(tokens) + [True]


def test_the_server_still_serves_after_the_table(client: FedtokenClient, world: World) -> None:
    assert client.verify(world.genuine, AUD).valid
    assert client.verify(client.issue("after", AUD, tenant=world.tenant).token, AUD).valid


def test_expected_issuer_and_tenant_mismatch(client: FedtokenClient, world: World) -> None:
    v = client.verify(world.genuine, AUD, issuer=world.other_issuer)
    assert reason_name(v.reason) == "ISSUER_MISMATCH"
    v = client.verify(world.genuine, AUD, tenant="default")
    assert reason_name(v.reason) == "TENANT_MISMATCH"


def test_the_table_has_every_class_of_the_guide() -> None:
    reasons = {r for _, _, r in CASES}
    assert reasons >= {"MALFORMED", "UNSUPPORTED_ALGORITHM", "UNSUPPORTED_HEADER",
                       "UNKNOWN_KEY", "BAD_SIGNATURE", "EXPIRED", "NOT_YET_VALID",
                       "ISSUED_IN_FUTURE", "AUDIENCE_MISMATCH", "MISSING_CLAIM",
                       "INVALID_CLAIM", "UNTRUSTED_ISSUER", "TENANT_MISMATCH"}
    assert len(CASES) >= 80




def test_revoke_by_token_uses_the_same_verification(client: FedtokenClient, world: World) -> None:
    from fedtoken_client import FedtokenRpcError

    # Authentic but not yet valid: revocable (it may become valid later).
    early = world.forge(nbf=now + 3600, jti=f"early-{uuid.uuid4().hex[:6]}")
    assert client.revoke(token=early).created
    # Authentic with an absurd exp, or forged: refused as INVALID_TOKEN.
    for token in (world.forge(exp=10**30), foreign_rsa(world), world.genuine + "x"):
        with pytest.raises(FedtokenRpcError) as info:
            client.revoke(token=token)
        assert (info.value.code.name, info.value.reason) == ("INVALID_ARGUMENT", "INVALID_TOKEN")
