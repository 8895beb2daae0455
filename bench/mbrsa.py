"""Micro-benchmark: multi-buffer RSA-2048 verification vs OpenSSL, one process.

    .venv/bin/python -m bench.mbrsa [--items 20000] [--keys 4] [--rounds 3] [--json]

On the same (key, signature, SHA-256 digest) items, in the same process and
run: OpenSSL's RSASSA-PKCS1-v1_5 verification through cryptography (prehashed,
so no hashing: one public operation, the padding check and the call) one item
at a time, against fedtoken._mbrsa's crypto_mb path in one call over all
items (lanes of eight). Prints the CPU model, the multi-buffer status, both
rates (best of the rounds) and their ratio. One thread each. ``--json``
prints one JSON object instead (``measure``'s result): what ``python -m
bench`` reads for its two limit rows, run as a process of its own.
"""

from __future__ import annotations

import argparse
import json
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


def measure(n_items: int = 20_000, n_keys: int = 4, rounds: int = 3) -> dict[str, object]:
    """Best-of-``rounds`` rates on the same items, one thread each:
    ``openssl`` (cryptography verify, prehashed), ``mb_wrapper``
    (multibuffer.verify_many with key handles) and ``mb_primitive``
    (fedtoken._mbrsa on prebuilt items); the multi-buffer ones are None when
    the path is unavailable (``status`` says why)."""
    rng = random.Random(1)
    pkcs1 = padding.PKCS1v15()
    pre = utils.Prehashed(hashes.SHA256())
    keys = [rsa.generate_private_key(65537, 2048) for _ in range(n_keys)]
    signed = []
    for k in keys:
        for _ in range(64):
            d = rng.randbytes(32)
            signed.append((k.public_key(), k.sign(d, pkcs1, pre), d))
    items = [rng.choice(signed) for _ in range(n_items)]
    out: dict[str, object] = {"cpu": cpu_model(), "cpus": os.cpu_count(),
                              "status": multibuffer.status(), "items": n_items, "keys": n_keys,
                              "openssl": None, "mb_wrapper": None, "mb_primitive": None}

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

    out["openssl"] = max(openssl_round() for _ in range(rounds))
    if not multibuffer.available():
        return out
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

    out["mb_wrapper"] = max(mb_round() for _ in range(rounds))
    out["mb_primitive"] = max(raw_round() for _ in range(rounds))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--keys", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    m = measure(args.items, args.keys, args.rounds)
    if args.json:
        print(json.dumps(m))
        return
    print(f"CPU: {m['cpu']} ({m['cpus']} logical CPUs)")
    print(f"multi-buffer: {m['status']}")
    ossl = float(m["openssl"])  # type: ignore[arg-type]
    print(f"OpenSSL (cryptography verify, prehashed), 1 thread: {ossl:,.0f}/s")
    if m["mb_wrapper"] is None:
        print("multi-buffer path unavailable: no ratio")
        return
    best_mb = float(m["mb_wrapper"])  # type: ignore[arg-type]
    best_raw = float(m["mb_primitive"])  # type: ignore[arg-type]
    print(f"crypto_mb multi-buffer (verify_many, key handles), 1 thread: {best_mb:,.0f}/s")
    print(f"crypto_mb primitive alone (prebuilt items), 1 thread: {best_raw:,.0f}/s")
    print(f"ratio multi-buffer / OpenSSL: {best_mb / ossl:.2f}x (wrapper), "
          f"{best_raw / ossl:.2f}x (primitive)")


if __name__ == "__main__":
    main()
