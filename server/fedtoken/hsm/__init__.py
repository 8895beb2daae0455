"""The HSM adapter: PKCS#11 signing and key generation (``Pkcs11Hsm``, a
``fedtoken.core.ports.Signer``), plus a SoftHSM dev token."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtoken.hsm.devtoken import DevToken, ensure_dev_token, find_softhsm_module
    from fedtoken.hsm.pkcs11 import LABEL_PREFIX, HsmConfig, Pkcs11Hsm

__all__ = [
    "LABEL_PREFIX",
    "DevToken",
    "HsmConfig",
    "Pkcs11Hsm",
    "ensure_dev_token",
    "find_softhsm_module",
]

_HOME = {
    "LABEL_PREFIX": "pkcs11",
    "HsmConfig": "pkcs11",
    "Pkcs11Hsm": "pkcs11",
    "DevToken": "devtoken",
    "ensure_dev_token": "devtoken",
    "find_softhsm_module": "devtoken",
}


def __getattr__(name: str) -> Any:
    # Submodules are imported on first use, not here: `python -m
    # fedtoken.hsm.devtoken` must neither find itself already imported (runpy
    # would run a second copy) nor need python-pkcs11 to create a token.
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
