"""The signing limit: a raw python-pkcs11 C_Sign loop on the service's token.

    python -m bench.hsmraw --state-dir DIR --label fedtoken/<tenant>/<kid> \
        --kid KID [--seconds 3] [--input-bytes 300]

Run as a process of its own (one thread: PKCS#11 is never entered from two
threads of one process) against the dev SoftHSM token that ``fedtoken serve
--state-dir DIR`` uses: the config DIR/softhsm/softhsm2.conf, the token
label ``fedtoken-dev`` and the user PIN read from DIR/softhsm/pin (never on a
command line), and the service's own signing key (the label and CKA_ID it
signs with). Signs an input of the size of a JWT signing input with
CKM_SHA256_RSA_PKCS in a loop for ``--seconds`` after a short warm-up and
prints one JSON object: {"signs_per_s", "signs", "seconds", "cpu_s"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def measure(state_dir: Path, label: str, kid: str, seconds: float, input_bytes: int,
            token_label: str = "fedtoken-dev") -> dict[str, float]:  # noqa: S107 - a label
    softhsm = state_dir.resolve() / "softhsm"
    # SoftHSM reads its config when the module is first loaded.
    os.environ["SOFTHSM2_CONF"] = str(softhsm / "softhsm2.conf")
    import pkcs11
    from pkcs11 import KeyType, Mechanism, ObjectClass

    from fedtoken.hsm.devtoken import find_softhsm_module

    module = find_softhsm_module()
    if module is None:
        raise SystemExit("libsofthsm2.so not found")
    pin = (softhsm / "pin").read_text(encoding="ascii").strip()
    token = pkcs11.lib(module).get_token(token_label=token_label)
    data = (b"eyJhbGciOiJSUzI1NiJ9." + b"x" * input_bytes)[:input_bytes]
    with token.open(user_pin=pin) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.RSA,
                              label=label, id=kid.encode())
        warm_until = time.perf_counter() + min(0.5, seconds / 4)
        while time.perf_counter() < warm_until:
            key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        n = 0
        cpu0 = time.process_time()
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
            n += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        elapsed = now - start
        cpu = time.process_time() - cpu0
    return {"signs_per_s": n / elapsed, "signs": float(n), "seconds": elapsed, "cpu_s": cpu}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hsmraw", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--label", required=True, help="the key's CKA_LABEL")
    p.add_argument("--kid", required=True, help="the key's CKA_ID (its kid)")
    p.add_argument("--token-label", default="fedtoken-dev")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--input-bytes", type=int, default=300)
    args = p.parse_args(argv)
    out = measure(args.state_dir, args.label, args.kid, args.seconds, args.input_bytes,
                  args.token_label)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
