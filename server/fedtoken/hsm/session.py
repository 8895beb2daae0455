"""The process's one logged-in session per PKCS#11 token, and the lock that
keeps every PKCS#11 call in this process apart.

Two properties of the library shape this module:

* python-pkcs11 initialises the module with ``C_Initialize(NULL)``, i.e.
  without OS locking, so the module must never be entered from two threads at
  once (SoftHSM corrupts memory). ``PKCS11_LOCK`` is the one lock that
  enforces it: a plain ``threading.Lock`` per process, taken around every
  PKCS#11 call (login, lookup, sign, generate, destroy, logout) by whichever
  thread makes it. Nothing else serialises the calls; the executors of
  ``Pkcs11Hsm`` only keep the event loop from waiting on this lock.
* Login belongs to the application, not to a session: a second login fails
  with UserAlreadyLoggedIn and closing a logged-in session logs the whole
  process out. So the process keeps one logged-in R/W session per token
  (``TokenChannel``), shared by every ``Pkcs11Hsm`` on that token, and never
  opens a session per signature.

Sessions and handles can die under us (HSM restart, failover, a token
re-plugged). ``TokenChannel.run`` drops the cached handles after those
errors, logs in again and retries the operation once; anything else becomes
``HsmUnavailable``. The PIN is never logged and never put in a message.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
from pkcs11 import KeyType, ObjectClass
from pkcs11.exceptions import (
    DeviceError,
    DeviceRemoved,
    KeyHandleInvalid,
    MultipleObjectsReturned,
    MultipleTokensReturned,
    NoSuchKey,
    NoSuchToken,
    ObjectHandleInvalid,
    PinExpired,
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    PKCS11Error,
    SessionClosed,
    SessionHandleInvalid,
    TokenNotPresent,
    UserAlreadyLoggedIn,
    UserNotLoggedIn,
    UserPinNotInitialized,
)

from fedtoken.core.errors import HsmUnavailable

__all__ = ["PKCS11_LOCK", "TokenChannel", "channel_for", "error_name"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

# After these the session or the handles we cached are gone, but a fresh
# session may well work: drop everything, log in again, retry once.
_SESSION_LOST: tuple[type[Exception], ...] = (
    SessionHandleInvalid,
    SessionClosed,
    UserNotLoggedIn,
    ObjectHandleInvalid,
    KeyHandleInvalid,
    DeviceRemoved,
    DeviceError,
    TokenNotPresent,
)
_BAD_PIN: tuple[type[Exception], ...] = (
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    PinExpired,
    UserPinNotInitialized,
)

# Every PKCS#11 call of this process runs with this lock held (see above).
PKCS11_LOCK = threading.Lock()
_CHANNELS: dict[tuple[str, str], TokenChannel] = {}


def channel_for(module: str, token_label: str) -> TokenChannel:
    """The process's channel to this token, created on first use.

    Keyed by realpath: two spellings of one library are one library, with
    one login state.
    """
    channel_key = (os.path.realpath(module), token_label)
    with PKCS11_LOCK:
        channel = _CHANNELS.get(channel_key)
        if channel is None:
            channel = _CHANNELS[channel_key] = TokenChannel(module, token_label)
        return channel


class TokenChannel:
    """This process's one logged-in R/W session to one token.

    Shared by every Pkcs11Hsm configured for the same module and token,
    because login is per application. Every method must be called with
    ``PKCS11_LOCK`` held.
    """

    def __init__(self, module: str, token_label: str) -> None:
        self.module = module
        self.token_label = token_label
        self.where = f"PKCS#11 module {module!r}, token {token_label!r}"
        self._pin = ""
        self._users = 0
        self._session: Any = None
        self._private_keys: dict[tuple[str, str], Any] = {}

    # --- users ----------------------------------------------------------------

    def join(self, pin: str) -> None:
        """Count one more user, logging in if nobody has; every user of one
        token must bring the same PIN."""
        if self._users == 0:
            self._pin = pin
        elif not hmac.compare_digest(self._pin.encode(), pin.encode()):
            raise HsmUnavailable(
                f"{self.where}: this process is already logged in with a different "
                "PIN; every configuration of one token must use the same PIN"
            )
        self.session()
        self._users += 1

    def leave(self) -> None:
        """Count one user less; the last one logs out and closes the session."""
        self._users -= 1
        if self._users == 0:
            self.drop()

    # --- the session ----------------------------------------------------------

    def session(self) -> Any:
        if self._session is None:
            self._session = self._login()
        return self._session

    def _login(self) -> Any:
        try:
            token = pkcs11.lib(self.module).get_token(token_label=self.token_label)
        except (NoSuchToken, TokenNotPresent) as exc:
            hint = ""
            if "softhsm" in self.module.lower():
                hint = (
                    "; for SoftHSM, check that SOFTHSM2_CONF names the config whose "
                    "tokendir holds the token (it is read once, when the process "
                    "first loads the module)"
                )
            raise HsmUnavailable(
                f"{self.where}: no token with this label is present. Check that the "
                f"HSM is reachable and the token is initialised with this label{hint}"
            ) from exc
        except MultipleTokensReturned as exc:
            raise HsmUnavailable(
                f"{self.where}: several tokens carry this label; give each a unique label"
            ) from exc
        except PKCS11Error as exc:
            raise HsmUnavailable(
                f"{self.where}: cannot load the module or list its tokens "
                f"({error_name(exc)}). Check the module path and the HSM client's own "
                "configuration"
            ) from exc
        try:
            try:
                return token.open(rw=True, user_pin=self._pin)
            except UserAlreadyLoggedIn:
                # Something else in this process is still logged in; a new
                # session shares that login (it is per application).
                return token.open(rw=True)
        except _BAD_PIN as exc:
            raise HsmUnavailable(
                f"{self.where}: the token refused the user login ({error_name(exc)}). "
                "Check that the configured user PIN is this token's user PIN and is "
                "not locked or expired (the PIN itself is never logged)"
            ) from exc
        except PKCS11Error as exc:
            raise HsmUnavailable(
                f"{self.where}: cannot open a logged-in read/write session ({error_name(exc)})"
            ) from exc

    def drop(self) -> None:
        """Forget the session and every handle obtained through it."""
        session, self._session = self._session, None
        self._private_keys.clear()
        if session is not None:
            # Best effort: the session is usually dead already, and a live
            # one is replaced either way.
            with contextlib.suppress(PKCS11Error):
                session.close()

    def run(self, what: str, operation: Callable[[TokenChannel], T]) -> T:
        """Run operation, translating PKCS#11 errors into HsmUnavailable;
        after a lost session, log in again and retry exactly once."""
        try:
            return operation(self)
        except _SESSION_LOST as exc:
            _log.warning(
                "%s: lost the session while trying to %s (%s); logging in again",
                self.where,
                what,
                error_name(exc),
            )
            self.drop()
        except PKCS11Error as exc:
            raise HsmUnavailable(f"{self.where}: failed to {what} ({error_name(exc)})") from exc
        try:
            return operation(self)
        except PKCS11Error as exc:
            raise HsmUnavailable(
                f"{self.where}: failed to {what} even after logging in again ({error_name(exc)})"
            ) from exc

    # --- key lookup -----------------------------------------------------------

    def find_key(self, object_class: Any, hsm_label: str, kid: str | None = None) -> Any:
        try:
            return self.session().get_key(
                object_class=object_class,
                key_type=KeyType.RSA,
                label=hsm_label,
                id=kid.encode() if kid is not None else None,
            )
        except NoSuchKey as exc:
            raise HsmUnavailable(
                f"{self.where}: key {hsm_label!r} is not in the token (destroyed, or "
                "this is not the token the key store describes); no other key is used",
                kid=kid or "",
            ) from exc
        except MultipleObjectsReturned as exc:
            raise HsmUnavailable(
                f"{self.where}: several objects carry label {hsm_label!r}; refusing to guess",
                kid=kid or "",
            ) from exc

    def private_key(self, hsm_label: str, kid: str) -> Any:
        """The signing key with this label *and* CKA_ID == kid, so a token
        header's kid always names the key that signed it. Handles are cached
        until the session is dropped or the key destroyed."""
        cache_key = (hsm_label, kid)
        key = self._private_keys.get(cache_key)
        if key is None:
            key = self.find_key(ObjectClass.PRIVATE_KEY, hsm_label, kid)
            self._private_keys[cache_key] = key
        return key

    def forget(self, hsm_label: str) -> None:
        for cache_key in [k for k in self._private_keys if k[0] == hsm_label]:
            del self._private_keys[cache_key]


def error_name(exc: BaseException) -> str:
    """PKCS#11 errors are identified by their class (the CKR_ code); their
    text adds nothing an operator needs."""
    return type(exc).__name__
