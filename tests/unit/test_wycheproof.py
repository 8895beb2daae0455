"""Project Wycheproof vectors through ``jose.verify_signature``.

Every ``valid`` case must verify and every ``invalid`` one must not. Every
``acceptable`` case is treated as must-reject. In these files there is exactly
one per key size, tcId 8, flag MissingNull: a PKCS#1 v1.5 signature whose
DigestInfo omits the NULL algorithm parameters. Wycheproof calls accepting it
legacy leniency, not a vulnerability; we reject it because RFC 8017 section
8.2.2 verifies by re-encoding the one canonical EncodedMessage and comparing,
our HSM always signs that canonical form, and accepting a second encoding
would make signatures malleable (two valid signatures for one token).

Keys are loaded through our trust-store rules (``keys.load_rsa_public_key``)
from the vectors' JWKs, so no group is skipped: all are RSA of 2048 bits or
more, and the "SmallPublicKey" groups use e = 3, which our rules allow (odd,
>= 3).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key

from fedtoken.core.jose import verify_signature
from fedtoken.core.keys import load_rsa_public_key
from fedtoken.core.model import ASYMMETRIC_ALGORITHMS

VECTORS = Path(
    os.environ.get(
        "FEDTOKEN_WYCHEPROOF_DIR",
        Path(__file__).resolve().parents[1] / "vectors" / "wycheproof",
    )
)
PKCS1_FILES = [f"rsa_signature_{bits}_sha256_test.json" for bits in (2048, 3072, 4096)]
PSS_FILE = "rsa_pss_2048_sha256_mgf1_32_test.json"
ECDSA_FILE = "ecdsa_secp256r1_sha256_p1363_test.json"

# Vendored with the tests: a missing directory is a failure, not a skip.
assert VECTORS.is_dir(), f"Wycheproof vectors not found at {VECTORS}"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return data


def cases(name: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    if not VECTORS.is_dir():
        return []
    return [
        (f"{name}:{t['tcId']}", group, t)
        for group in load(name)["testGroups"]
        for t in group["tests"]
    ]


def check(alg: str, group: dict[str, Any], test: dict[str, Any]) -> None:
    jwk = group.get("publicKeyJwk") or group["keyJwk"]
    key = load_rsa_public_key(jwk)
    assert (
        key.public_numbers()
        == load_der_public_key(bytes.fromhex(group["publicKeyDer"])).public_numbers()
    )  # type: ignore[union-attr]
    msg, sig = bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"])
    accepted = verify_signature(alg, key, msg, sig)
    assert accepted is (test["result"] == "valid"), (test["tcId"], test["comment"], test["flags"])
    if accepted:
        # A valid signature under one scheme is valid under no other. (Some
        # invalid cases are genuine signatures of another scheme, e.g. the
        # WrongHash and WrongPrimitive flags, so only valid ones are checked.)
        for other in sorted(ASYMMETRIC_ALGORITHMS - {alg}):
            assert not verify_signature(other, key, msg, sig)


PKCS1 = [c for f in PKCS1_FILES for c in cases(f)]
PSS = cases(PSS_FILE)


@pytest.mark.parametrize(("tc", "group", "test"), PKCS1, ids=[c[0] for c in PKCS1])
def test_rs256(tc: str, group: dict[str, Any], test: dict[str, Any]) -> None:
    assert group["sha"] == "SHA-256"
    check("RS256", group, test)


@pytest.mark.parametrize(("tc", "group", "test"), PSS, ids=[c[0] for c in PSS])
def test_ps256(tc: str, group: dict[str, Any], test: dict[str, Any]) -> None:
    # The file's parameters are exactly RFC 7518 PS256: SHA-256, MGF1 with
    # SHA-256, salt length 32 (the digest length). Its flags differ from the
    # PKCS#1 files: Normal and SpecialCaseHash are valid, ModifiedSignature
    # (padding altered before signing) and WrongPrimitive (a PKCS#1 v1.5
    # signature) are invalid; there are no acceptable cases.
    assert (group["sha"], group["mgf"], group["mgfSha"], group["sLen"]) == (
        "SHA-256",
        "MGF1",
        "SHA-256",
        32,
    )
    check("PS256", group, test)


def test_expected_case_counts() -> None:
    results = [t["result"] for _, _, t in PKCS1]
    assert results.count("acceptable") == 3
    assert {t["flags"][0] for _, _, t in PKCS1 if t["result"] == "acceptable"} == {"MissingNull"}
    assert results.count("valid") > 0 and results.count("invalid") > 700
    assert len(PSS) == 108


def test_ecdsa_vectors_never_verify() -> None:
    # ES256 is not an algorithm of ours: no EC signature, valid or forged
    # (r = s = 0 included, CVE-2022-21449), may pass under any name.
    for group in load(ECDSA_FILE)["testGroups"]:
        key = load_der_public_key(bytes.fromhex(group["publicKeyDer"]))
        for test in group["tests"]:
            msg, sig = bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"])
            for alg in ("ES256", "RS256", "PS256"):
                assert not verify_signature(alg, key, msg, sig)
