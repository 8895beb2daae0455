"""A SoftHSM token for development and tests, created on demand.

Production points fedtoken at a real HSM. Developers, tests and the README's
commands get the same code path with no root and no manual steps: a SoftHSM
config and token store under a state directory, and a token whose user and
SO PINs are random and kept in 0600 files beside it.

No PIN is ever put on a command line (``/proc/<pid>/cmdline`` is readable
by every user) or in an environment: softhsm2-util takes PINs only as
arguments or from a terminal, so the token is initialised over PKCS#11
itself (``C_InitToken``, then ``C_InitPIN``) by a short-lived child,
``fedtoken/hsm/_inittoken.py``, that reads both PINs from a pipe on its
stdin. softhsm2-util is only used to list the slots. Production tokens are
still never made this way: their PINs are the HSM operator's business.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtoken.core.errors import FedtokenError, HsmUnavailable, InvalidRequest

if TYPE_CHECKING:
    from fedtoken.hsm.pkcs11 import HsmConfig

__all__ = ["DEFAULT_LABEL", "DevToken", "ensure_dev_token", "find_softhsm_module"]

DEFAULT_LABEL = "fedtoken-dev"

_SOFTHSM_MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
_INSTALL_HINT = "install SoftHSM v2 (Debian/Ubuntu: apt-get install softhsm2)"

_TEMPLATE_PATH = Path(__file__).parents[3] / "softhsm" / "softhsm2.conf.template"
# Used when fedtoken is installed without its source tree (non-editable).
_DEFAULT_TEMPLATE = """\
directories.tokendir = @TOKENDIR@
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""


@dataclass(frozen=True)
class DevToken:
    """Where a dev token is and how to reach it. Holds the PIN's file, not the PIN."""

    module: str
    conf_path: Path
    token_label: str
    pin_file: Path

    def read_pin(self) -> str:
        return self.pin_file.read_text(encoding="ascii").strip()

    def hsm_config(self) -> HsmConfig:
        """The Pkcs11Hsm configuration for this token. SOFTHSM2_CONF must
        already name ``conf_path`` when the process first loads the module."""
        # Imported here so that creating a token does not need python-pkcs11.
        from fedtoken.hsm.pkcs11 import HsmConfig

        return HsmConfig(module=self.module, token_label=self.token_label, pin=self.read_pin())


def find_softhsm_module() -> str | None:
    """Path of libsofthsm2.so in the usual install locations, if any."""
    for path in _SOFTHSM_MODULE_PATHS:
        if os.path.isfile(path):
            return path
    return None


def ensure_dev_token(state_dir: Path, label: str = DEFAULT_LABEL) -> DevToken:
    """Make sure ``state_dir`` holds a SoftHSM config and an initialised token
    called ``label``; create whatever is missing. Idempotent and safe to run
    from several processes at once."""
    if not label or len(label.encode("utf-8")) > 32 or label != label.strip():
        # CKA_LABEL of a token is 32 bytes, space padded: longer or padded
        # labels could not be found again.
        raise InvalidRequest(
            "token label must be 1-32 bytes without surrounding spaces", field="label"
        )
    util = shutil.which("softhsm2-util")
    module = find_softhsm_module()
    if util is None or module is None:
        missing = "softhsm2-util" if util is None else "libsofthsm2.so"
        raise HsmUnavailable(f"SoftHSM is not installed ({missing} not found): {_INSTALL_HINT}")

    softhsm_dir = state_dir.resolve() / "softhsm"
    tokens_dir = softhsm_dir / "tokens"
    # 0700: the directory holds the PIN files and the token's key material.
    softhsm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens_dir.mkdir(mode=0o700, exist_ok=True)
    conf = softhsm_dir / "softhsm2.conf"
    pin_file = softhsm_dir / "pin"
    so_pin_file = softhsm_dir / "so-pin"

    with _exclusive(softhsm_dir / ".lock"):
        _write_if_changed(conf, _template().replace("@TOKENDIR@", str(tokens_dir)))
        if label in _initialised_labels(util, conf):
            if not pin_file.is_file():
                raise HsmUnavailable(
                    f"token {label!r} exists in {tokens_dir} but its PIN file {pin_file} "
                    f"is gone; delete {tokens_dir} to start over with a new token"
                )
        else:
            # Reusing existing PIN files keeps one PIN pair per state directory,
            # whichever tokens it holds.
            pin = _read_or_create_secret(pin_file)
            so_pin = _read_or_create_secret(so_pin_file)
            _run(
                _init_token_argv(module, label),
                conf,
                "initialise the token",
                stdin=f"{so_pin}\n{pin}\n",
            )
    return DevToken(module=module, conf_path=conf, token_label=label, pin_file=pin_file)


def _template() -> str:
    try:
        return _TEMPLATE_PATH.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _DEFAULT_TEMPLATE


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    # Replace atomically: a process loading SoftHSM meanwhile must never read
    # half a config.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_or_create_secret(path: Path) -> str:
    try:
        # O_EXCL with mode 0600: the file is never readable by others, not even
        # for a moment, and an existing secret is never overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip()
    secret = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secret + "\n")
    return secret


_INIT_HELPER = Path(__file__).with_name("_inittoken.py")


def _init_token_argv(module: str, label: str) -> list[str]:
    """The command line that initialises a free token as label: the helper
    run isolated (standard library only). The PINs go to its stdin, never
    here."""
    return [sys.executable, "-I", str(_INIT_HELPER), module, label]


def _initialised_labels(util: str, conf: Path) -> set[str]:
    labels: set[str] = set()
    initialised = False
    # --show-slots prints "Initialized: yes|no" before "Label: ..." per slot.
    for line in _run([util, "--show-slots"], conf, "softhsm2-util --show-slots").splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Initialized":
            initialised = value.strip() == "yes"
        elif key == "Label" and initialised:
            labels.add(value.strip())
    return labels


def _run(argv: list[str], conf: Path, what: str, stdin: str | None = None) -> str:
    """Run argv with SOFTHSM2_CONF=conf; secrets go through stdin only."""
    result = subprocess.run(
        argv,
        input=stdin,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise HsmUnavailable(
            f"{what} failed with exit code {result.returncode} "
            f"(SOFTHSM2_CONF={conf}): {result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise token setup across processes (parallel test workers)."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    """Create the dev token; print shell assignments describing it (never the PIN)."""
    parser = argparse.ArgumentParser(
        prog="python -m fedtoken.hsm.devtoken",
        description="Create (if needed) a SoftHSM token for fedtoken development.",
    )
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("label", nargs="?", default=DEFAULT_LABEL)
    args = parser.parse_args(argv)
    try:
        token = ensure_dev_token(args.state_dir, args.label)
    except FedtokenError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    for name, value in (
        ("SOFTHSM2_CONF", token.conf_path),
        ("PKCS11_MODULE", token.module),
        ("TOKEN_LABEL", token.token_label),
        ("PIN_FILE", token.pin_file),
    ):
        print(f"{name}={shlex.quote(str(value))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
