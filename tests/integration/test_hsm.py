"""The PKCS#11 adapter against a real SoftHSM token: no mocks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers
from cryptography.hazmat.primitives.hashes import SHA256

from fedtoken.core.errors import ErrorReason, HsmUnavailable, InvalidRequest, PolicyViolation
from fedtoken.core.ports import GeneratedKey, Signer
from fedtoken.hsm import LABEL_PREFIX, HsmConfig, Pkcs11Hsm, devtoken
from fedtoken.hsm.devtoken import DevToken, ensure_dev_token
from tests._hsm_fixture import hsm_devtoken  # noqa: F401

pytestmark = pytest.mark.integration

SERVER_DIR = Path(__file__).resolve().parents[2] / "server"


def _b64url_uint(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def _public_key(jwk: dict[str, Any]) -> RSAPublicKey:
    return RSAPublicNumbers(_b64url_uint(jwk["e"]), _b64url_uint(jwk["n"])).public_key()


def _rfc7638_thumbprint(jwk: dict[str, Any]) -> str:
    # Computed here from the exported JWK, independently of fedtoken.core.jwk.
    members = json.dumps(
        {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
    )
    digest = hashlib.sha256(members.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _verifies(jwk: dict[str, Any], signature: bytes, data: bytes) -> bool:
    try:
        _public_key(jwk).verify(signature, data, PKCS1v15(), SHA256())
    except InvalidSignature:
        return False
    return True


@pytest.fixture(scope="module")
def hsm(hsm_devtoken: DevToken) -> Iterator[Pkcs11Hsm]:  # noqa: F811
    with Pkcs11Hsm(hsm_devtoken.hsm_config()) as instance:
        yield instance


@pytest.fixture(scope="module")
def key(hsm: Pkcs11Hsm) -> Iterator[GeneratedKey]:
    generated = hsm.generate_rsa_keypair("acme")
    yield generated
    hsm.destroy_key(generated.hsm_label)


def test_kid_is_the_rfc7638_thumbprint_of_the_exported_key(
    hsm: Pkcs11Hsm, key: GeneratedKey
) -> None:
    exported = hsm.public_jwk(key.hsm_label)
    assert exported == key.public_jwk
    assert exported["kid"] == key.kid == _rfc7638_thumbprint(exported)
    assert (exported["kty"], exported["alg"], exported["e"]) == ("RSA", "RS256", "AQAB")
    assert _public_key(exported).key_size == key.key_size == 2048


def test_private_key_never_leaves_the_token(hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    assert hsm.private_key_attributes(key.hsm_label) == {
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "ALWAYS_SENSITIVE": True,
        "NEVER_EXTRACTABLE": True,
        "SIGN": True,
        "DECRYPT": False,
    }


def test_signatures_verify_under_the_exported_jwk(hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    inputs = [b"header.payload-1", b"header.payload-2", b""]
    signatures = hsm.sign_many(key.hsm_label, key.kid, inputs)
    assert len(signatures) == len(inputs)
    for data, signature in zip(inputs, signatures, strict=True):
        assert len(signature) == 256
        assert _verifies(key.public_jwk, signature, data)
    assert not _verifies(key.public_jwk, signatures[0], b"header.payload-X")
    assert hsm.sign_many(key.hsm_label, key.kid, []) == []


def test_labels_carry_tenant_and_kid(hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    assert key.hsm_label == f"{LABEL_PREFIX}acme/{key.kid}"
    assert key.hsm_label in hsm.list_labels()
    assert all(label.startswith(LABEL_PREFIX) for label in hsm.list_labels())


def test_keys_below_2048_bits_are_refused(hsm: Pkcs11Hsm) -> None:
    before = hsm.list_labels()
    with pytest.raises(PolicyViolation) as caught:
        hsm.generate_rsa_keypair("acme", bits=1024)
    assert caught.value.reason is ErrorReason.POLICY_VIOLATION
    with pytest.raises(PolicyViolation):
        HsmConfig(module="/dev/null", token_label="x", pin="x", key_size=1024)
    # The one key-size rule (core.policy.check_key_size) also bounds the top
    # and wants whole octets.
    for bits in (2047, 2052, 16384):
        with pytest.raises(PolicyViolation):
            hsm.generate_rsa_keypair("acme", bits=bits)
        with pytest.raises(PolicyViolation):
            HsmConfig(module="/dev/null", token_label="x", pin="x", key_size=bits)
    assert hsm.list_labels() == before


def test_signing_with_an_unknown_key_is_refused(hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    with pytest.raises(HsmUnavailable) as caught:
        hsm.sign_many(f"{LABEL_PREFIX}acme/no-such-kid", "no-such-kid", [b"x"])
    assert caught.value.reason is ErrorReason.HSM_UNAVAILABLE
    # The right label with another kid names a different key: also refused.
    with pytest.raises(HsmUnavailable) as caught:
        hsm.sign_many(key.hsm_label, "another-kid", [b"x"])
    assert caught.value.reason is ErrorReason.HSM_UNAVAILABLE


def test_keys_outside_the_fedtoken_namespace_are_never_touched(hsm: Pkcs11Hsm) -> None:
    for call in (
        lambda: hsm.sign_many("other-app/key", "kid", [b"x"]),
        lambda: hsm.destroy_key("other-app/key"),
        lambda: hsm.generate_rsa_keypair("acme/evil"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            call()
        assert caught.value.reason is ErrorReason.INVALID_FIELD


def test_an_absent_token_is_unavailable(hsm_devtoken: DevToken) -> None:  # noqa: F811
    config = HsmConfig(module=hsm_devtoken.module, token_label="no-such-token", pin="x")
    with pytest.raises(HsmUnavailable) as caught:
        Pkcs11Hsm(config).open()
    assert caught.value.reason is ErrorReason.HSM_UNAVAILABLE


def test_a_wrong_pin_is_unavailable_and_never_shown(hsm_devtoken: DevToken) -> None:  # noqa: F811
    # Login is per process, and this one is logged in: try it in a fresh one.
    wrong_pin = "wrong-pin-Zq8V3kT1"
    script = textwrap.dedent(
        """
        import os, traceback
        from fedtoken.hsm import HsmConfig, Pkcs11Hsm
        from fedtoken.core.errors import HsmUnavailable
        config = HsmConfig(os.environ["MODULE"], os.environ["LABEL"], os.environ["PIN"])
        try:
            Pkcs11Hsm(config).open()
        except HsmUnavailable as exc:
            print("REASON=" + exc.reason.name)
            traceback.print_exc()
        print(repr(config))
        """
    )
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(hsm_devtoken.conf_path),
        "PYTHONPATH": os.pathsep.join(
            path for path in (str(SERVER_DIR), os.environ.get("PYTHONPATH")) if path
        ),
        "MODULE": hsm_devtoken.module,
        "LABEL": hsm_devtoken.token_label,
        "PIN": wrong_pin,
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "REASON=HSM_UNAVAILABLE" in result.stdout
    output = result.stdout + result.stderr
    assert "PinIncorrect" in output  # the chained PKCS#11 error is kept
    assert wrong_pin not in output


def test_dev_token_is_idempotent_and_keeps_the_pin_private(
    hsm_devtoken: DevToken,  # noqa: F811
) -> None:
    state = hsm_devtoken.conf_path.parent.parent
    assert ensure_dev_token(state, hsm_devtoken.token_label) == hsm_devtoken
    assert hsm_devtoken.pin_file.stat().st_mode & 0o777 == 0o600
    assert (hsm_devtoken.pin_file.parent / "so-pin").stat().st_mode & 0o777 == 0o600
    pin = hsm_devtoken.read_pin()
    assert pin not in repr(hsm_devtoken)
    assert pin not in repr(hsm_devtoken.hsm_config())


def test_the_init_command_line_carries_no_pin() -> None:
    argv = devtoken._init_token_argv("/usr/lib/softhsm/libsofthsm2.so", "some-label")
    # The helper, run isolated, with the module and the label: nothing else
    # (the PINs go to its stdin).
    assert argv == [
        sys.executable,
        "-I",
        str(SERVER_DIR / "fedtoken" / "hsm" / "_inittoken.py"),
        "/usr/lib/softhsm/libsofthsm2.so",
        "some-label",
    ]
    assert not any(arg.startswith("--pin") or arg.startswith("--so-pin") for arg in argv)


def test_a_fresh_dev_token_is_made_without_a_pin_on_any_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Record every child devtoken starts (argv, environment, stdin), then use
    # the new token in a fresh process, logging in with the PIN file.
    calls: list[tuple[list[str], dict[str, Any]]] = []
    real_run = subprocess.run

    def recording_run(argv: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append((list(argv), kwargs))
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    token = ensure_dev_token(tmp_path / "state", "fedtoken-fresh")
    monkeypatch.undo()

    pin = token.read_pin()
    so_pin = (token.pin_file.parent / "so-pin").read_text(encoding="ascii").strip()
    assert len(pin) >= 16 and len(so_pin) >= 16 and pin != so_pin
    assert calls, "the token was not created through a child process"
    for argv, kwargs in calls:
        environment = " ".join(f"{k}={v}" for k, v in (kwargs.get("env") or {}).items())
        for secret in (pin, so_pin):
            assert not any(secret in arg for arg in argv), argv[0]
            assert secret not in environment, argv[0]
    init_calls = [kwargs for argv, kwargs in calls if argv[2:3] == [str(devtoken._INIT_HELPER)]]
    assert len(init_calls) == 1
    assert init_calls[0]["input"] == f"{so_pin}\n{pin}\n"

    script = textwrap.dedent(
        """
        import os
        from pathlib import Path
        from fedtoken.hsm import HsmConfig, Pkcs11Hsm
        pin = Path(os.environ["PIN_FILE"]).read_text().strip()
        with Pkcs11Hsm(HsmConfig(os.environ["MODULE"], os.environ["LABEL"], pin)) as hsm:
            key = hsm.generate_rsa_keypair("fresh")
            (signature,) = hsm.sign_many(key.hsm_label, key.kid, [b"fresh token"])
            print("SIGNED", len(signature), hsm.list_labels() == [key.hsm_label])
        """
    )
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(token.conf_path),
        "PYTHONPATH": os.pathsep.join(
            path for path in (str(SERVER_DIR), os.environ.get("PYTHONPATH")) if path
        ),
        "MODULE": token.module,
        "LABEL": token.token_label,
        "PIN_FILE": str(token.pin_file),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SIGNED", "256", "True"]
    # Creating it again changes nothing and starts no initialisation.
    calls.clear()
    monkeypatch.setattr(subprocess, "run", recording_run)
    assert ensure_dev_token(tmp_path / "state", "fedtoken-fresh") == token
    monkeypatch.undo()
    assert all(argv[2:3] != [str(devtoken._INIT_HELPER)] for argv, _ in calls)


def test_the_init_helper_reports_errors_without_the_pins(tmp_path: Path) -> None:
    # No free slot can be found in a store that is not there; the message
    # names the failing call, never a PIN.
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'missing'}\nobjectstore.backend = file\n")
    so_pin, pin = "so-pin-Xq81mZt0", "user-pin-Kd93LwQ2"
    result = subprocess.run(
        devtoken._init_token_argv(devtoken.find_softhsm_module() or "", "x"),
        input=f"{so_pin}\n{pin}\n",
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot initialise token 'x'" in result.stderr
    assert so_pin not in result.stderr + result.stdout
    assert pin not in result.stderr + result.stdout


async def test_async_sign_concurrently(hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    inputs = [[f"token-{i}-a".encode(), f"token-{i}-b".encode()] for i in range(200)]
    results = await asyncio.gather(*(hsm.sign(key.hsm_label, key.kid, batch) for batch in inputs))
    for batch, signatures in zip(inputs, results, strict=True):
        for data, signature in zip(batch, signatures, strict=True):
            assert _verifies(key.public_jwk, signature, data)


async def test_two_instances_share_the_process_login(
    hsm_devtoken: DevToken,  # noqa: F811
    hsm: Pkcs11Hsm,
    key: GeneratedKey,
) -> None:
    second = Pkcs11Hsm(hsm_devtoken.hsm_config())
    second.open()  # would be UserAlreadyLoggedIn without the shared session
    try:
        # Both instances' worker threads at once: the process-wide lock
        # serialises them.
        first_results, second_results = await asyncio.gather(
            asyncio.gather(*(hsm.sign(key.hsm_label, key.kid, [b"a"]) for _ in range(50))),
            asyncio.gather(*(second.sign(key.hsm_label, key.kid, [b"b"]) for _ in range(50))),
        )
        assert all(_verifies(key.public_jwk, sigs[0], b"a") for sigs in first_results)
        assert all(_verifies(key.public_jwk, sigs[0], b"b") for sigs in second_results)
    finally:
        await second.aclose()
    # The first instance still holds the session.
    (signature,) = hsm.sign_many(key.hsm_label, key.kid, [b"after"])
    assert _verifies(key.public_jwk, signature, b"after")


async def test_generate_and_destroy_asynchronously(hsm: Pkcs11Hsm) -> None:
    generated = await hsm.generate("globex", 3072)
    assert generated.key_size == 3072
    assert generated.hsm_label in hsm.list_labels()
    await hsm.destroy(generated.hsm_label)
    assert generated.hsm_label not in hsm.list_labels()
    for call in (
        lambda: hsm.sign_many(generated.hsm_label, generated.kid, [b"x"]),
        lambda: hsm.public_jwk(generated.hsm_label),
    ):
        with pytest.raises(HsmUnavailable) as caught:
            call()
        assert caught.value.reason is ErrorReason.HSM_UNAVAILABLE
    await hsm.destroy(generated.hsm_label)  # idempotent


async def test_a_burst_through_the_signer_port_is_serialised(
    hsm_devtoken: DevToken,  # noqa: F811
    hsm: Pkcs11Hsm,
    key: GeneratedKey,
) -> None:
    # Many tasks on two instances (two worker threads) and a plain thread
    # calling the sync API, all at once: the process-wide PKCS#11 lock lets
    # one call into the library at a time, so every signature is whole and
    # signs exactly its own input.
    second = Pkcs11Hsm(hsm_devtoken.hsm_config())
    signers: list[Signer] = [hsm, second]
    stop = threading.Event()
    sync_results: list[tuple[bytes, bytes]] = []

    def sync_signer() -> None:
        i = 0
        while not stop.is_set():
            data = f"sync-{i}".encode()
            (signature,) = hsm.sign_many(key.hsm_label, key.kid, [data])
            sync_results.append((data, signature))
            i += 1

    async def task(n: int) -> list[tuple[bytes, bytes]]:
        signer = signers[n % 2]
        done: list[tuple[bytes, bytes]] = []
        for round_ in range(5):
            batch = [f"task-{n}-{round_}-{j}".encode() for j in range(n % 3 + 1)]
            signatures = await signer.sign(key.hsm_label, key.kid, batch)
            assert len(signatures) == len(batch)
            done.extend(zip(batch, signatures, strict=True))
        return done

    thread = threading.Thread(target=sync_signer)
    thread.start()
    try:
        results = await asyncio.gather(*(asyncio.create_task(task(n)) for n in range(64)))
    finally:
        stop.set()
        thread.join()
        await second.aclose()
    signed = [pair for done in results for pair in done]
    assert len(signed) == 5 * sum(n % 3 + 1 for n in range(64))
    assert sync_results
    signed += sync_results
    assert len({data for data, _ in signed}) == len(signed)
    for data, signature in signed:
        assert _verifies(key.public_jwk, signature, data)


def test_signing_survives_a_lost_session(hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    hsm.sign_many(key.hsm_label, key.kid, [b"warm the key handle cache"])
    # Close the shared session behind the adapter's back (also logs the
    # process out, as an HSM restart would).
    hsm._channel.session().close()
    (signature,) = hsm.sign_many(key.hsm_label, key.kid, [b"after the session died"])
    assert _verifies(key.public_jwk, signature, b"after the session died")


def test_concurrent_signs_are_batched_and_each_caller_gets_its_own(
    hsm: Pkcs11Hsm, key: GeneratedKey
) -> None:
    jwk = hsm.public_jwk(key.hsm_label)
    public = RSAPublicNumbers(_b64url_uint(jwk["e"]), _b64url_uint(jwk["n"])).public_key()
    messages = [[f"call {i} part {j}".encode() for j in range(1 + i % 3)] for i in range(40)]

    async def run() -> list[list[bytes]]:
        before = hsm.sign_batches
        results = await asyncio.gather(*(hsm.sign(key.hsm_label, key.kid, m) for m in messages))
        assert hsm.sign_batches - before < len(messages)  # shared worker hops
        return list(results)

    results = asyncio.run(run())
    for inputs, signatures in zip(messages, results, strict=True):
        assert len(signatures) == len(inputs)
        for data, signature in zip(inputs, signatures, strict=True):
            public.verify(signature, data, PKCS1v15(), SHA256())


def test_a_failed_sign_batch_fails_every_caller_in_it(hsm: Pkcs11Hsm) -> None:
    async def run() -> list[BaseException | list[bytes]]:
        return await asyncio.gather(
            *(hsm.sign(f"{LABEL_PREFIX}acme-missing", "no-such-kid", [b"x"]) for _ in range(10)),
            return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, HsmUnavailable) for r in results)
