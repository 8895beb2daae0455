"""The HSM adapter heals after an outage, without restarting the process.

SoftHSM (like most PKCS#11 libraries) keeps the slot and token state it read
at ``C_Initialize``; once the token has gone away, only finalising and
initialising the library again shows it the token that came back. These
tests run in a fresh subprocess on a private dev token with its own
SOFTHSM2_CONF, because the library is loaded (and SOFTHSM2_CONF read) once
per process, and the token they take away must not be the one the rest of
the test session signs with.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fedtoken.hsm.devtoken import ensure_dev_token

pytestmark = pytest.mark.integration

SERVER_DIR = Path(__file__).resolve().parents[2] / "server"

# The start of every child script: counts the library re-initialisations
# that really happen, so the tests can show they are rate limited.
_PRELUDE = """
import asyncio, json, os, sys, time
from pathlib import Path
from fedtoken.core.errors import HsmUnavailable
from fedtoken.hsm import HsmConfig, Pkcs11Hsm, session

reinits = []
_library_class = getattr(session, "_Library", None)  # absent before the fix

if _library_class is not None:
    _real_reinitialise = _library_class.reinitialise_if_due

    def _counting(self):
        before = self._initialised_at
        done = _real_reinitialise(self)
        if self._initialised_at != before:
            reinits.append(time.monotonic())
        return done

    _library_class.reinitialise_if_due = _counting
pin = Path(os.environ["PIN_FILE"]).read_text().strip()
out = {"interval": getattr(session, "REINIT_INTERVAL", 0.5)}
"""

# Runs in the child. Prints one JSON line, prefixed RESULT=.
_OUTAGE_SCRIPT = _PRELUDE + textwrap.dedent(
    """
    tokens = Path(os.environ["TOKENDIR"])
    away = tokens.with_name(tokens.name + ".away")
    config = HsmConfig(os.environ["MODULE"], os.environ["LABEL"], pin)
    hsm = Pkcs11Hsm(config)
    hsm.open()
    key = hsm.generate_rsa_keypair("acme")
    out["before"] = len(hsm.sign_many(key.hsm_label, key.kid, [b"before"])[0])

    # The outage: the token store named in softhsm2.conf is gone.
    tokens.rename(away)
    went_away = time.monotonic()
    reasons, failed_for = [], []
    for _ in range(int(os.environ["DOWN_ATTEMPTS"])):
        started = time.monotonic()
        try:
            hsm.sign_many(key.hsm_label, key.kid, [b"while down"])
            reasons.append("SIGNED")
        except HsmUnavailable as exc:
            reasons.append(exc.reason.name)
        failed_for.append(time.monotonic() - started)
        time.sleep(0.05)
    out["down_reasons"] = reasons
    out["down_slowest"] = max(failed_for)
    # Through the async Signer port too.
    try:
        asyncio.run(hsm.sign(key.hsm_label, key.kid, [b"async while down"]))
        out["down_async"] = "SIGNED"
    except HsmUnavailable as exc:
        out["down_async"] = exc.reason.name

    # The token comes back; the same process, the same Pkcs11Hsm.
    away.rename(tokens)
    restored = time.monotonic()
    deadline = restored + float(os.environ["RECOVERY_SECONDS"])
    attempts, last_error = 0, ""
    while True:
        attempts += 1
        try:
            signature = hsm.sign_many(key.hsm_label, key.kid, [b"after"])[0]
            out["recovered_after"] = time.monotonic() - restored
            out["after"] = len(signature)
            break
        except HsmUnavailable as exc:
            last_error = str(exc)
        if time.monotonic() > deadline:
            out["recovered_after"] = None
            break
        time.sleep(0.1)
    out["attempts"] = attempts
    out["last_error"] = last_error
    if out.get("after"):
        fresh = asyncio.run(hsm.generate("globex", 2048))
        out["generated"] = fresh.hsm_label in hsm.list_labels()
        out["fresh_signed"] = len(
            asyncio.run(hsm.sign(fresh.hsm_label, fresh.kid, [b"new key"]))[0])
        asyncio.run(hsm.destroy(fresh.hsm_label))
        out["fresh_destroyed"] = fresh.hsm_label not in hsm.list_labels()
    hsm.close()
    out["reinits"] = [t - went_away for t in reinits if t >= went_away]
    out["outage_and_recovery"] = time.monotonic() - went_away
    print("RESULT=" + json.dumps(out))
    """
)

# Two tokens behind one library; only the first one's directory goes away.
_ONE_OF_TWO_SCRIPT = _PRELUDE + textwrap.dedent(
    """
    first = Pkcs11Hsm(HsmConfig(os.environ["MODULE"], os.environ["LABEL"], pin))
    second = Pkcs11Hsm(HsmConfig(os.environ["MODULE"], os.environ["LABEL2"], pin))
    first.open()
    second.open()
    first_key = first.generate_rsa_keypair("acme")
    second_key = second.generate_rsa_keypair("acme")
    token_dir = Path(os.environ["TOKEN_SUBDIR"])
    away = token_dir.parent.parent / "away"
    time.sleep(out["interval"])  # past the first load's quiet time

    def attempt(hsm, key):
        try:
            hsm.sign_many(key.hsm_label, key.kid, [b"x"])
            return "SIGNED"
        except HsmUnavailable as exc:
            return exc.reason.name

    token_dir.rename(away)
    down = []
    for _ in range(15):
        down.append((attempt(first, first_key), attempt(second, second_key)))
        time.sleep(0.1)
    away.rename(token_dir)
    restored = time.monotonic()
    up = []
    while time.monotonic() < restored + 10:
        up.append((attempt(first, first_key), attempt(second, second_key)))
        if up[-1][0] == "SIGNED":
            out["recovered_after"] = time.monotonic() - restored
            break
        time.sleep(0.1)
    out["down"] = sorted(set(down))
    out["up"] = sorted(set(up))
    out["second_always_signed"] = all(s == "SIGNED" for _, s in down + up)
    first.close()
    second.close()
    print("RESULT=" + json.dumps(out))
    """
)


def _run_child(script: str, env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT=")]
    assert lines, result.stdout + result.stderr
    outcome: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT="))
    outcome["_stderr"] = result.stderr
    return outcome


def _child_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], str]:
    # The child's own token (and SOFTHSM2_CONF), never the session's token.
    token = ensure_dev_token(tmp_path / "state", "fedtoken-outage")
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(token.conf_path),
        "PYTHONPATH": os.pathsep.join(
            path for path in (str(SERVER_DIR), os.environ.get("PYTHONPATH")) if path
        ),
        "MODULE": token.module,
        "LABEL": token.token_label,
        "PIN_FILE": str(token.pin_file),
        "TOKENDIR": str(token.conf_path.parent / "tokens"),
        **extra,
    }
    return env, token.read_pin()


def test_signing_recovers_after_the_token_comes_back(tmp_path: Path) -> None:
    env, pin = _child_env(tmp_path, DOWN_ATTEMPTS="30", RECOVERY_SECONDS="10")
    out = _run_child(_OUTAGE_SCRIPT, env)

    assert out["before"] == 256
    # While the token is away every attempt is refused, as HSM_UNAVAILABLE,
    # and quickly (no hammering, no hanging).
    assert out["down_reasons"] == ["HSM_UNAVAILABLE"] * 30
    assert out["down_async"] == "HSM_UNAVAILABLE"
    assert out["down_slowest"] < 2.0
    # Once it is back, the same process signs again within about a second.
    assert out["recovered_after"] is not None, out["last_error"]
    assert out["recovered_after"] < 3.0
    assert out["after"] == 256
    # And the token is fully usable again: generate, sign, destroy.
    assert out["generated"] is True
    assert out["fresh_signed"] == 256
    assert out["fresh_destroyed"] is True
    # The PIN appears nowhere, not even in the warnings about the outage.
    assert pin not in out["_stderr"] + out["last_error"]
    # Re-initialisations are rate limited (the library is not hammered while
    # the token is away) and were needed: at least one happened.
    reinits = out["reinits"]
    assert reinits
    gaps = [later - earlier for earlier, later in itertools.pairwise(reinits)]
    assert all(gap >= out["interval"] * 0.99 for gap in gaps), gaps
    assert len(reinits) <= out["outage_and_recovery"] / out["interval"] + 1


def test_one_token_away_leaves_the_other_signing(tmp_path: Path) -> None:
    # Two tokens in one token store, so behind one library: re-initialising
    # the library for the first must never fail the second, which only
    # logs in again. SoftHSM keeps listing a token whose own directory is
    # gone but shows none of its keys, even once the directory is back,
    # until the library is re-initialised.
    env, _ = _child_env(tmp_path)
    tokens = Path(env["TOKENDIR"])
    first_dirs = set(tokens.iterdir())
    assert len(first_dirs) == 1
    second = ensure_dev_token(tmp_path / "state", "fedtoken-other")
    env.update(LABEL2=second.token_label, TOKEN_SUBDIR=str(next(iter(first_dirs))))

    out = _run_child(_ONE_OF_TWO_SCRIPT, env)

    assert out["second_always_signed"] is True, (out["down"], out["up"])
    assert out["down"] == [["HSM_UNAVAILABLE", "SIGNED"]]
    assert out.get("recovered_after") is not None, out["up"]
    assert out["recovered_after"] < 3.0
