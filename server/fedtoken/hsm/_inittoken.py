"""Initialise a PKCS#11 token with PINs read from stdin, never from argv.

Run by ``fedtoken.hsm.devtoken`` as a short-lived child process::

    python -I _inittoken.py MODULE LABEL   < "SO_PIN\\nUSER_PIN\\n"

It takes the first slot holding an uninitialised token (what
``softhsm2-util --init-token --free`` does), calls ``C_InitToken`` with the
SO PIN and LABEL, logs in as SO and sets the user PIN with ``C_InitPIN``.
softhsm2-util only accepts PINs as arguments or from a terminal, and
python-pkcs11 has no ``C_InitToken``, so this speaks PKCS#11 through ctypes.
The PINs travel over a pipe only the parent holds: not in this process's
command line (``/proc/<pid>/cmdline``) nor in its environment
(``/proc/<pid>/environ``). Standard library only, so it runs isolated
(``-I``) without fedtoken or python-pkcs11 on its path. Errors name the
failing call and its CKR_ code, never a PIN.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CK_SLOT_ID = CK_ULONG
CK_SESSION_HANDLE = CK_ULONG

CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKU_SO = 0
CKR_USER_NOT_LOGGED_IN = 0x101


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class CK_TOKEN_INFO(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", CK_VERSION),
        ("firmwareVersion", CK_VERSION),
        ("utcTime", ctypes.c_char * 16),
    ]


# CK_FUNCTION_LIST up to C_Logout, in the order the standard fixes.
_FUNCTIONS = (
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
)


class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("version", CK_VERSION), *((name, ctypes.c_void_p) for name in _FUNCTIONS)]


_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[Any, ...]] = {
    "C_Initialize": (_P,),
    "C_Finalize": (_P,),
    "C_GetSlotList": (ctypes.c_ubyte, ctypes.POINTER(CK_SLOT_ID), ctypes.POINTER(CK_ULONG)),
    "C_GetTokenInfo": (CK_SLOT_ID, ctypes.POINTER(CK_TOKEN_INFO)),
    "C_InitToken": (CK_SLOT_ID, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p),
    "C_OpenSession": (CK_SLOT_ID, CK_ULONG, _P, _P, ctypes.POINTER(CK_SESSION_HANDLE)),
    "C_Login": (CK_SESSION_HANDLE, CK_ULONG, ctypes.c_char_p, CK_ULONG),
    "C_InitPIN": (CK_SESSION_HANDLE, ctypes.c_char_p, CK_ULONG),
    "C_Logout": (CK_SESSION_HANDLE,),
    "C_CloseSession": (CK_SESSION_HANDLE,),
}


class InitError(Exception):
    pass


class _Module:
    def __init__(self, path: str) -> None:
        self._dll = ctypes.CDLL(path)
        get_list = self._dll.C_GetFunctionList
        get_list.restype = CK_RV
        get_list.argtypes = (ctypes.POINTER(ctypes.POINTER(CK_FUNCTION_LIST)),)
        functions = ctypes.POINTER(CK_FUNCTION_LIST)()
        self.check("C_GetFunctionList", get_list(ctypes.byref(functions)))
        self._functions = functions.contents

    def call(self, name: str, *args: Any) -> int:
        """Call a PKCS#11 function; return its CK_RV."""
        pointer = getattr(self._functions, name)
        if not pointer:
            raise InitError(f"{name} is not provided by this module")
        function = ctypes.CFUNCTYPE(CK_RV, *_SIGNATURES[name])(pointer)
        return int(function(*args))

    def __call__(self, name: str, *args: Any) -> None:
        self.check(name, self.call(name, *args))

    @staticmethod
    def check(name: str, rv: int) -> None:
        if rv != 0:
            raise InitError(f"{name} failed with CKR 0x{rv:08x}")


def _free_slot(module: _Module) -> int:
    count = CK_ULONG(0)
    module("C_GetSlotList", 1, None, ctypes.byref(count))
    slots = (CK_SLOT_ID * max(count.value, 1))()
    module("C_GetSlotList", 1, slots, ctypes.byref(count))
    for slot in slots[: count.value]:
        info = CK_TOKEN_INFO()
        module("C_GetTokenInfo", slot, ctypes.byref(info))
        if not info.flags & CKF_TOKEN_INITIALIZED:
            return int(slot)
    raise InitError("no slot holds an uninitialised token")


def init_token(module_path: str, label: str, so_pin: bytes, user_pin: bytes) -> None:
    """Initialise the first free token as label, with these PINs."""
    padded = label.encode("utf-8")
    if not padded or len(padded) > 32:
        raise InitError("the token label must be 1-32 bytes")
    padded = padded.ljust(32, b" ")
    module = _Module(module_path)
    module("C_Initialize", None)
    try:
        slot = _free_slot(module)
        module("C_InitToken", slot, so_pin, len(so_pin), padded)
        session = CK_SESSION_HANDLE(0)
        module(
            "C_OpenSession",
            slot,
            CKF_SERIAL_SESSION | CKF_RW_SESSION,
            None,
            None,
            ctypes.byref(session),
        )
        try:
            module("C_Login", session, CKU_SO, so_pin, len(so_pin))
            module("C_InitPIN", session, user_pin, len(user_pin))
            rv = module.call("C_Logout", session)
            if rv not in (0, CKR_USER_NOT_LOGGED_IN):
                module.check("C_Logout", rv)
        finally:
            module.call("C_CloseSession", session)
    finally:
        module.call("C_Finalize", None)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: _inittoken.py MODULE LABEL  (SO PIN and user PIN on stdin)", file=sys.stderr)
        return 2
    lines = sys.stdin.buffer.read().splitlines()
    if len(lines) < 2 or not lines[0] or not lines[1]:
        print("expected the SO PIN and the user PIN on stdin, one per line", file=sys.stderr)
        return 2
    try:
        init_token(argv[0], argv[1], so_pin=lines[0], user_pin=lines[1])
    except (InitError, OSError) as exc:
        print(f"cannot initialise token {argv[1]!r}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
