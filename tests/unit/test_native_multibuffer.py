"""fedtoken._native's KeyTable with the multi-buffer core (fedtoken._mbrsa's
C API) against the same table on OpenSSL only.

Every token, valid or corrupted, mixed keys in every lane position, must get
the same answer from both tables; should OpenSSL ever hand a signature back
to Python that the core decides (it refuses s >= n before any arithmetic),
the Python path's verdict on that token must be the invalid signature the
core reported.
These tests run everywhere; the multibuffer_slots check is the one that needs
crypto_mb and AVX-512 IFMA.
"""

from __future__ import annotations

import json
import random

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedtoken.core.jose import verify_signature
from fedtoken.core.jwk import b64url_decode, b64url_encode
from fedtoken.verifier import multibuffer
from fedtoken.verifier.native import NATIVE

pytestmark = pytest.mark.skipif(NATIVE is None, reason="fedtoken._native not built")

FALLBACK, INVALID = 0, 0x80


def _keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(65537, bits) for bits in (2048, 2048, 3072, 4096)] + [
        rsa.generate_private_key(3, 2048)  # e != 65537: always OpenSSL
    ]


@pytest.fixture(scope="module")
def world() -> tuple[list[tuple[bytes, bytes]], list[tuple[str, rsa.RSAPrivateKey]]]:
    keys = _keys()
    entries, headers = [], []
    for i, key in enumerate(keys):
        header = b64url_encode(json.dumps({"alg": "RS256", "kid": f"k{i}"}).encode()).encode()
        der = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        entries.append((header, der))
        headers.append((header.decode(), key))
    return entries, headers


def _token(header: str, key: rsa.RSAPrivateKey, rng: random.Random) -> str:
    payload = b64url_encode(json.dumps({"iss": "i", "jti": rng.getrandbits(64)}).encode())
    signing_input = f"{header}.{payload}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url_encode(sig)}"


def _corrupt(token: str, key: rsa.RSAPrivateKey, rng: random.Random) -> str:
    head, _, sig_b64 = token.rpartition(".")
    sig = bytearray(b64url_decode(sig_b64))
    n = key.public_key().public_numbers().n
    k = len(sig)
    kind = rng.randrange(7)
    if kind == 0:
        sig[rng.randrange(k)] ^= 1 << rng.randrange(8)
    elif kind == 1:
        sig = bytearray(k)  # s = 0
    elif kind == 2:
        sig = bytearray((1).to_bytes(k, "big"))
    elif kind == 3:
        sig = bytearray((n - 1).to_bytes(k, "big"))
    elif kind == 4:
        sig = bytearray(n.to_bytes(k, "big"))  # s = n
    elif kind == 5:
        sig = bytearray((n + 1).to_bytes(k, "big"))
    else:
        sig = bytearray(b"\xff" * k)  # s > n
    return f"{head}.{b64url_encode(bytes(sig))}"


def test_multibuffer_and_openssl_tables_agree(world) -> None:  # type: ignore[no-untyped-def]
    entries, headers = world
    with_mb = NATIVE.KeyTable(entries, 16384)
    openssl = NATIVE.KeyTable(entries, 16384, multibuffer=False)
    assert openssl.multibuffer_slots() == 0
    rng = random.Random(20261202)
    tokens: list[str] = []
    keys: list[rsa.RSAPrivateKey] = []
    for _ in range(1500):
        header, key = headers[rng.randrange(len(headers))]
        token = _token(header, key, rng)
        if rng.random() < 0.4:
            token = _corrupt(token, key, rng)
        tokens.append(token)
        keys.append(key)
    tokens.append("not.a.token")
    keys.append(keys[0])
    a_status, a_payloads, _ = with_mb.verify(tokens)
    b_status, b_payloads, _ = openssl.verify(tokens)
    assert len(a_status) == len(tokens)
    decided_by_mb = 0
    for i, (a, b) in enumerate(zip(a_status, b_status, strict=True)):
        if a == b:
            assert a_payloads[i] == b_payloads[i]
            continue
        # Only s >= n: the core says invalid, OpenSSL leaves it to Python,
        # whose verdict must be "invalid" too.
        assert a & INVALID and b == FALLBACK, (i, a, b)
        signing_input, _, sig = tokens[i].rpartition(".")
        assert not verify_signature("RS256", keys[i].public_key(), signing_input.encode(),
                                    b64url_decode(sig))
        decided_by_mb += 1
    valid = sum(1 for a in a_status if a and not a & INVALID)
    assert valid > 800  # the corpus is mostly valid tokens: the test has teeth
    invalid = sum(1 for a in a_status if a & INVALID)
    assert invalid > 300 and decided_by_mb <= invalid


def test_table_uses_multibuffer_where_the_cpu_has_it(world) -> None:  # type: ignore[no-untyped-def]
    entries, _ = world
    table = NATIVE.KeyTable(entries, 16384)
    if multibuffer.available():
        # 2048/3072/4096 with e = 65537; the e = 3 key stays on OpenSSL.
        assert table.multibuffer_slots() == 4
    else:
        assert table.multibuffer_slots() == 0


def test_a_fresh_process_finds_the_core_without_importing_it_first() -> None:
    """The engine never imports fedtoken._mbrsa itself: the table must find
    its C API on its own (a capsule lookup needs the submodule imported)."""
    import subprocess
    import sys

    code = (
        "from cryptography.hazmat.primitives.asymmetric import rsa\n"
        "from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat\n"
        "from fedtoken.verifier.engine import VerificationEngine\n"
        "from fedtoken.verifier.native import NATIVE\n"
        "der = rsa.generate_private_key(65537, 2048).public_key().public_bytes(\n"
        "    Encoding.DER, PublicFormat.SubjectPublicKeyInfo)\n"
        "print(NATIVE.KeyTable([(b'h', der)], 1000).multibuffer_slots())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == ("1" if multibuffer.available() else "0")
