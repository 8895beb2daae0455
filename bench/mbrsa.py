"""Micro-benchmark: multi-buffer RSA-2048 verification vs OpenSSL, one process.

    .venv/bin/python -m bench.mbrsa [--items 20000] [--keys 4] [--rounds 3]

On the same (key, signature, SHA-256 digest) items, in the same process and
run: OpenSSL's RSASSA-PKCS1-v1_5 verification through cryptography (prehashed,
so no hashing: one public operation, the padding check and the call) one item
at a time, against fedtoken._mbrsa's crypto_mb path in one call over all
items (lanes of eight). Prints the CPU model, the multi-buffer status, both
rates (best of the rounds) and their ratio. One thread each.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from fedtoken.verifier import multibuffer


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(f"multi-buffer: {multibuffer.status()}")
    rng = random.Random(1)
    pkcs1 = padding.PKCS1v15()
    pre = utils.Prehashed(hashes.SHA256())
    keys = [rsa.generate_private_key(65537, 2048) for _ in range(args.keys)]
    signed = []
    for k in keys:
        for _ in range(64):
            d = rng.randbytes(32)
            signed.append((k.public_key(), k.sign(d, pkcs1, pre), d))
    items = [rng.choice(signed) for _ in range(args.items)]

    def openssl_round() -> float:
        t = time.perf_counter()
        ok = 0
        for pub, sig, d in items:
            try:
                pub.verify(sig, d, pkcs1, pre)
                ok += 1
            except InvalidSignature:
                pass
        dt = time.perf_counter() - t
        assert ok == len(items)
        return len(items) / dt

    best_ossl = max(openssl_round() for _ in range(args.rounds))
    print(f"OpenSSL (cryptography verify, prehashed), 1 thread: {best_ossl:,.0f}/s")
    if not multibuffer.available():
        print("multi-buffer path unavailable: no ratio")
        return
    handles = {id(p): multibuffer.key_handle(p) for p, _, _ in signed}
    h_keys = [handles[id(p)] for p, _, _ in items]
    sigs = [s for _, s, _ in items]
    digs = [d for _, _, d in items]

    def mb_round() -> float:
        t = time.perf_counter()
        verdicts = multibuffer.verify_many(h_keys, sigs, digs)  # type: ignore[arg-type]
        dt = time.perf_counter() - t
        assert all(v is True for v in verdicts)
        return len(items) / dt

    # The primitive alone on prebuilt (handle, signature, digest) tuples:
    # what a native batch pipeline calling it per batch would pay.
    from fedtoken import _mbrsa  # type: ignore[attr-defined]

    prebuilt = list(zip(h_keys, sigs, digs, strict=True))

    def raw_round() -> float:
        t = time.perf_counter()
        answers = _mbrsa.verify_pkcs1_sha256_mb(prebuilt)
        dt = time.perf_counter() - t
        assert answers == b"\x01" * len(prebuilt)
        return len(items) / dt

    best_mb = max(mb_round() for _ in range(args.rounds))
    best_raw = max(raw_round() for _ in range(args.rounds))
    print(f"crypto_mb multi-buffer (verify_many, key handles), 1 thread: {best_mb:,.0f}/s")
    print(f"crypto_mb primitive alone (prebuilt items), 1 thread: {best_raw:,.0f}/s")
    print(f"ratio multi-buffer / OpenSSL: {best_mb / best_ossl:.2f}x (wrapper), "
          f"{best_raw / best_ossl:.2f}x (primitive)")


if __name__ == "__main__":
    main()
