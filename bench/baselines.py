"""The baselines: OpenSSL's own RSA verify rate, and PyJWT's one-thread loop."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Sequence

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import RSAAlgorithm

# "rsa 2048 bits 0.000123s 0.000010s   8106.0  97981.5" (sign/s, verify/s);
# OpenSSL 3.2+ may add encaps/decaps columns after them.
_RSA_LINE = re.compile(r"^rsa\s+2048 bits\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", re.M)


def openssl_command(seconds: int, procs: int) -> list[str]:
    cmd = ["openssl", "speed", "-seconds", str(seconds)]
    if procs > 1:
        cmd += ["-multi", str(procs)]
    return [*cmd, "rsa2048"]


def openssl_verify_rate(seconds: int, procs: int) -> float:
    """RSA-2048 verifications per second, summed over ``procs`` processes."""
    out = subprocess.run(openssl_command(seconds, procs), capture_output=True, text=True,
                         check=True, timeout=seconds * 6 + 60).stdout
    found = _RSA_LINE.findall(out)
    if not found:
        raise RuntimeError(f"cannot read openssl speed output:\n{out}")
    return float(found[-1][1])


def pyjwt_rate(tokens: Sequence[str], jwks: dict[str, str], audience: str, issuer: str,
               seconds: float) -> float:
    """What a user would write with PyJWT: read the kid, look the key up,
    jwt.decode with audience and issuer; one thread, cycling over the tokens."""
    keys = {kid: RSAAlgorithm.from_jwk(jwk) for kid, jwk in jwks.items()}
    public = {kid: k if isinstance(k, RSAPublicKey) else k.public_key() for kid, k in keys.items()}
    done = 0
    n = len(tokens)
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while True:
        for token in tokens[done % n : done % n + 200]:
            kid = jwt.get_unverified_header(token)["kid"]
            jwt.decode(token, public[kid], algorithms=["RS256"], audience=audience, issuer=issuer)
        done += min(200, n - done % n)
        if time.perf_counter() >= deadline:
            return done / (time.perf_counter() - start)


def jwks_by_kid(public_jwk_jsons: Sequence[str]) -> dict[str, str]:
    return {json.loads(j)["kid"]: j for j in public_jwk_jsons}
