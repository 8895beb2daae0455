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
re-plugged), and so can the library's own view of its slots and tokens:
SoftHSM, like many PKCS#11 libraries, reads its token store at
``C_Initialize`` and, once the store has gone away, keeps failing
(``CKR_GENERAL_ERROR``, token not present) even after it is back. So
``TokenChannel.run`` recovers in two steps:

1. after a lost session or handle it drops the cached handles, logs in
   again and retries;
2. after an error that means the library's slot or token state is gone (or
   when a fresh session did not help) it re-initialises the library
   (``C_Finalize`` + ``C_Initialize`` on python-pkcs11's cached ``lib``,
   which forgets every session of every channel on that library), logs in
   again and retries once more. A key the token does not show is looked up
   once more after a re-initialisation too (SoftHSM hides the objects of a
   token directory that went away and came back until then), but that
   alone never makes the token "down".

Re-initialising is rate limited: at most one per ``REINIT_INTERVAL`` per
library, and a channel that is still down after it refuses calls at once
(``HsmUnavailable``, without entering the library) until the interval has
passed. So while the HSM is away calls fail fast and the library is not
hammered, and once it is back the next call after at most one interval
heals the process. Everything happens with ``PKCS11_LOCK`` held, like every
other PKCS#11 call. Other errors become ``HsmUnavailable`` at once; there is
never a software fallback. The PIN is never logged and never put in a
message.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import pkcs11
from pkcs11 import KeyType, ObjectClass
from pkcs11.exceptions import (
    DeviceError,
    DeviceRemoved,
    GeneralError,
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
    SlotIDInvalid,
    TokenNotPresent,
    TokenNotRecognised,
    UserAlreadyLoggedIn,
    UserNotLoggedIn,
    UserPinNotInitialized,
)

from fedtoken.core.errors import HsmUnavailable

__all__ = ["PKCS11_LOCK", "REINIT_INTERVAL", "TokenChannel", "channel_for", "error_name"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

# After these the session or the handles we cached are gone, but a fresh
# session may well work: drop everything, log in again, retry.
_SESSION_LOST: tuple[type[Exception], ...] = (
    SessionHandleInvalid,
    SessionClosed,
    UserNotLoggedIn,
    ObjectHandleInvalid,
    KeyHandleInvalid,
)
# After these the library's view of its slots and tokens is gone (device
# removed or failed, token store unreadable, slot list changed): only
# re-initialising the library can show it the token again. NoSuchToken is
# here because a library re-initialised while the token was away lists
# none; CKR_CRYPTOKI_NOT_INITIALIZED (a bare PKCS11Error) is matched in
# _loss().
_LIBRARY_LOST: tuple[type[Exception], ...] = (
    DeviceRemoved,
    DeviceError,
    GeneralError,
    TokenNotPresent,
    TokenNotRecognised,
    SlotIDInvalid,
    NoSuchToken,
)
_BAD_PIN: tuple[type[Exception], ...] = (
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    PinExpired,
    UserPinNotInitialized,
)

# At most one re-initialisation of a library per this many seconds; a
# channel still down after one refuses calls without entering the library
# until then.
REINIT_INTERVAL = 0.5

# Every PKCS#11 call of this process runs with this lock held (see above).
PKCS11_LOCK = threading.Lock()
_CHANNELS: dict[tuple[str, str], TokenChannel] = {}
_LIBRARIES: dict[str, _Library] = {}


def channel_for(module: str, token_label: str) -> TokenChannel:
    """The process's channel to this token, created on first use.

    Keyed by realpath: two spellings of one library are one library, with
    one login state.
    """
    path = os.path.realpath(module)
    with PKCS11_LOCK:
        channel = _CHANNELS.get((path, token_label))
        if channel is None:
            library = _LIBRARIES.get(path)
            if library is None:
                library = _LIBRARIES[path] = _Library(path)
            channel = _CHANNELS[(path, token_label)] = TokenChannel(module, token_label, library)
        return channel


class _Loss(enum.Enum):
    # The session or handles are gone: log in again.
    SESSION = "session"
    # The library's slot or token state is gone: re-initialise it.
    LIBRARY = "library"
    # The token answers but lacks a key fedtoken expects. Usually the key
    # really is gone (and the caller is told so), but SoftHSM also reports
    # this for a token whose directory went away and came back, until it is
    # re-initialised: re-initialise (rate limited) and look once more,
    # without declaring the token down.
    STALE = "stale"


def _loss(exc: BaseException) -> _Loss | None:
    """What an error says is gone: the session, the library's token state,
    maybe the library's view of the token's objects, or (None) nothing a
    reconnection could repair (bad PIN, a refused operation)."""
    if isinstance(exc, HsmUnavailable):
        # _login and find_key wrap the PKCS#11 error; its cause tells.
        cause = exc.__cause__
        return _loss(cause) if isinstance(cause, PKCS11Error) else None
    if isinstance(exc, _SESSION_LOST):
        return _Loss.SESSION
    if isinstance(exc, _LIBRARY_LOST):
        return _Loss.LIBRARY
    if isinstance(exc, NoSuchKey):
        return _Loss.STALE
    if type(exc) is PKCS11Error and "not initialized" in str(exc):
        # python-pkcs11 raises CKR_CRYPTOKI_NOT_INITIALIZED as a bare PKCS11Error.
        return _Loss.LIBRARY
    return None


class _Library:
    """One PKCS#11 library (by realpath) as this process has loaded it.

    python-pkcs11 caches one ``lib`` object per path string and initialises
    it once; this wrapper always uses the realpath, so that cache holds one
    object per library, and re-initialises it when its state is lost. Every
    method must be called with ``PKCS11_LOCK`` held.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # python-pkcs11's lib object once loaded, and the monotonic time of
        # its load or last re-initialisation.
        self._lib: Any = None
        self._initialised_at: float | None = None

    def get(self) -> Any:
        """python-pkcs11's lib: loaded and initialised on first use, and
        initialised again if an earlier re-initialisation failed half way."""
        lib = pkcs11.lib(self.path)
        if self._lib is None:
            self._lib = lib
            self._initialised_at = time.monotonic()
        return lib

    def reinitialise_if_due(self) -> bool:
        """Finalise and initialise the library again, unless that (or its
        first load) happened less than REINIT_INTERVAL ago; True if it did
        (or it was never loaded, so the next use loads it fresh)."""
        if self._lib is None or self._initialised_at is None:
            return True
        now = time.monotonic()
        if now - self._initialised_at < REINIT_INTERVAL:
            return False
        self._initialised_at = now
        # C_Finalize closes every session of this library, in every channel.
        # Forget them without closing: after C_Initialize the library hands
        # out the same handle numbers again, and closing a stale handle
        # would close someone's new session.
        for channel in _CHANNELS.values():
            if channel.library is self:
                channel.forget_session()
        # finalize() is a no-op if an earlier C_Initialize failed, and marks
        # the lib uninitialised even when C_Finalize fails; a failed
        # C_Initialize is retried by pkcs11.lib() on the next use (get()).
        with contextlib.suppress(PKCS11Error):
            self._lib.finalize()
        try:
            self._lib.initialize()
        except PKCS11Error as exc:
            _log.debug("re-initialising %s failed (%s)", self.path, error_name(exc))
        return True


class TokenChannel:
    """This process's one logged-in R/W session to one token.

    Shared by every Pkcs11Hsm configured for the same module and token,
    because login is per application. Every method must be called with
    ``PKCS11_LOCK`` held.
    """

    def __init__(self, module: str, token_label: str, library: _Library) -> None:
        self.module = module
        self.token_label = token_label
        self.library = library
        self.where = f"PKCS#11 module {module!r}, token {token_label!r}"
        self._pin = ""
        self._users = 0
        self._session: Any = None
        self._private_keys: dict[tuple[str, str], Any] = {}
        # While down: since when (monotonic), the last error's name, and
        # when the next attempt to reconnect may be made.
        self._down_since: float | None = None
        self._down_error = ""
        self._retry_at = 0.0

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
        self.run("log in", lambda channel: channel.session())
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
            token = self.library.get().get_token(token_label=self.token_label)
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
        """Close the session (best effort) and forget every handle obtained
        through it."""
        session = self._session
        self.forget_session()
        if session is not None:
            # Best effort: the session is usually dead already, and a live
            # one is replaced either way.
            with contextlib.suppress(PKCS11Error):
                session.close()

    def forget_session(self) -> None:
        """Forget the session and its handles without closing anything (the
        library has been, or is about to be, finalised)."""
        self._session = None
        self._private_keys.clear()

    # --- running an operation, with recovery ------------------------------------

    def run(self, what: str, operation: Callable[[TokenChannel], T]) -> T:
        """Run operation, translating PKCS#11 errors into HsmUnavailable.

        A lost session: log in again and retry. A lost library state, or a
        fresh session that did not help: re-initialise the library (rate
        limited), log in again and retry once more. Still failing: the
        channel is down and refuses calls at once until REINIT_INTERVAL has
        passed, then tries again.
        """
        if self._down_since is not None:
            now = time.monotonic()
            if now < self._retry_at:
                raise HsmUnavailable(
                    f"{self.where}: the HSM has been unavailable for "
                    f"{now - self._down_since:.1f} s ({self._down_error}); next attempt "
                    f"to reconnect in {(self._retry_at - now) * 1000:.0f} ms"
                )
            self.drop()
            self.library.reinitialise_if_due()
            return self._last_attempt(what, operation)
        try:
            return operation(self)
        except (PKCS11Error, HsmUnavailable) as exc:
            loss = _loss(exc)
            if loss is None:
                self._raise(what, exc)
            error = exc
        if loss is _Loss.SESSION:
            _log.warning(
                "%s: lost the session while trying to %s (%s); logging in again",
                self.where,
                what,
                _name(error),
            )
            self.drop()
            try:
                return operation(self)
            except (PKCS11Error, HsmUnavailable) as exc:
                loss = _loss(exc)
                if loss is None:
                    self._raise(what, exc)
                error = exc
        self.drop()
        if not self.library.reinitialise_if_due():
            if loss is not _Loss.STALE:
                self._mark_down(error)
            self._raise(what, error)
        _log.warning(
            "%s: %s while trying to %s (%s); re-initialised the library",
            self.where,
            "a key is missing" if loss is _Loss.STALE else "the library lost the token",
            what,
            _name(error),
        )
        return self._last_attempt(what, operation)

    def _last_attempt(self, what: str, operation: Callable[[TokenChannel], T]) -> T:
        try:
            result = operation(self)
        except (PKCS11Error, HsmUnavailable) as exc:
            if _loss(exc) in (_Loss.SESSION, _Loss.LIBRARY):
                self._mark_down(exc)
            else:
                # The token answered (say, with "no such key"): it is back.
                self._mark_up()
            self._raise(what, exc)
        self._mark_up()
        return result

    def _mark_up(self) -> None:
        if self._down_since is not None:
            _log.warning(
                "%s: the HSM is available again after %.1f s",
                self.where,
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    def _mark_down(self, error: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            _log.error(
                "%s: the HSM is unavailable (%s); calls fail at once and a "
                "reconnection is tried at most every %.1f s",
                self.where,
                _name(error),
                REINIT_INTERVAL,
            )
        self._down_error = _name(error)
        self._retry_at = now + REINIT_INTERVAL

    def _raise(self, what: str, exc: BaseException) -> NoReturn:
        """Raise exc as HsmUnavailable: itself if it is one (its PKCS#11
        cause stays chained), else a new one chained to it."""
        if isinstance(exc, HsmUnavailable):
            raise exc
        raise HsmUnavailable(f"{self.where}: failed to {what} ({error_name(exc)})") from exc

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


def _name(exc: BaseException) -> str:
    """error_name of the PKCS#11 error behind exc (which may wrap it)."""
    cause = exc.__cause__ if isinstance(exc, HsmUnavailable) else None
    return error_name(cause if isinstance(cause, PKCS11Error) else exc)


def error_name(exc: BaseException) -> str:
    """PKCS#11 errors are identified by their class (the CKR_ code); their
    text adds nothing an operator needs."""
    return type(exc).__name__
