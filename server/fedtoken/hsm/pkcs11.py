"""PKCS#11 signing: RSA keys are generated and used inside the HSM, never outside.

Everything that knows about PKCS#11 lives in this module. Three properties of
the library shape it:

* python-pkcs11 initialises the module with ``C_Initialize(NULL)``, i.e.
  without OS locking, so the module must never be entered from two threads at
  once (SoftHSM corrupts memory). Every call in this process goes through one
  lock, ``_PKCS11_LOCK``; the async wrappers run on one single-thread executor
  per instance so the event loop never blocks on that lock.
* Login belongs to the application, not to a session: a second login fails
  with UserAlreadyLoggedIn and closing a logged-in session logs the whole
  process out. So the process keeps one logged-in R/W session per token
  (``_TokenChannel``), shared by every ``Pkcs11Hsm`` on that token, and never
  opens a session per signature.
* Sessions and handles can die under us (HSM restart, failover, a token
  re-plugged). Those errors drop the cached handles, log in again and retry
  the operation once; anything else becomes ``HsmUnavailable``. There is no
  software fallback: if the token cannot sign, nothing is signed.

The PIN is never logged and never put in an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
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

from fedtoken.core.jwk import rsa_public_jwk, rsa_thumbprint
from fedtoken.core.model import MIN_RSA_BITS
from fedtoken.core.errors import HsmUnavailable, InvalidRequest, PolicyViolation

__all__ = ["LABEL_PREFIX", "GeneratedKey", "HsmConfig", "Pkcs11Hsm"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

# Labels of complete fedtoken key pairs: f"fedtoken/{tenant}/{kid}". Only
# objects under this prefix are ever listed, used or destroyed, so fedtoken
# cannot touch other applications' keys on a shared HSM.
LABEL_PREFIX = "fedtoken/"
# A freshly generated pair carries this prefix until its kid is known; one
# left behind by a crash is not listed and never signs.
_PENDING_PREFIX = "fedtoken-pending/"

_PUBLIC_EXPONENT = 65537
_RS256 = Mechanism.SHA256_RSA_PKCS

_PRIVATE_TEMPLATE: dict[Any, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_PUBLIC_TEMPLATE: dict[Any, Any] = {
    Attribute.TOKEN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.PUBLIC_EXPONENT: _PUBLIC_EXPONENT.to_bytes(3, "big"),
}
# The protection a private key must have, and what private_key_attributes
# reports: sensitive and non-extractable since generation, sign-only.
_REQUIRED_PRIVATE: dict[Any, bool] = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ALWAYS_SENSITIVE: True,
    Attribute.NEVER_EXTRACTABLE: True,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
}

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


@dataclass(frozen=True)
class HsmConfig:
    """Where the signing keys live and how to log in to them."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    key_size: int = 2048

    def __post_init__(self) -> None:
        _check_bits(self.key_size)


@dataclass(frozen=True)
class GeneratedKey:
    """A key pair just created in the token; only public material leaves it."""

    kid: str
    hsm_label: str
    public_jwk: dict[str, Any]
    key_size: int
    alg: str = "RS256"


class _TokenChannel:
    """This process's one logged-in R/W session to one token.

    Shared by every Pkcs11Hsm configured for the same module and token,
    because login is per application. Only touched under ``_PKCS11_LOCK``.
    """

    def __init__(self, module: str, token_label: str) -> None:
        self.module = module
        self.token_label = token_label
        self.where = f"PKCS#11 module {module!r}, token {token_label!r}"
        self.pin = ""
        self.users = 0
        self._session: Any = None
        self._private_keys: dict[tuple[str, str], Any] = {}

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
                f"({_name(exc)}). Check the module path and the HSM client's own "
                "configuration"
            ) from exc
        try:
            try:
                return token.open(rw=True, user_pin=self.pin)
            except UserAlreadyLoggedIn:
                # Something else in this process is still logged in; a new
                # session shares that login (it is per application).
                return token.open(rw=True)
        except _BAD_PIN as exc:
            raise HsmUnavailable(
                f"{self.where}: the token refused the user login ({_name(exc)}). "
                "Check that the configured user PIN is this token's user PIN and is "
                "not locked or expired (the PIN itself is never logged)"
            ) from exc
        except PKCS11Error as exc:
            raise HsmUnavailable(
                f"{self.where}: cannot open a logged-in read/write session ({_name(exc)})"
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
        header's kid always names the key that signed it."""
        cache_key = (hsm_label, kid)
        key = self._private_keys.get(cache_key)
        if key is None:
            key = self.find_key(ObjectClass.PRIVATE_KEY, hsm_label, kid)
            self._private_keys[cache_key] = key
        return key

    def forget(self, hsm_label: str) -> None:
        for cache_key in [k for k in self._private_keys if k[0] == hsm_label]:
            del self._private_keys[cache_key]


_PKCS11_LOCK = threading.Lock()
_CHANNELS: dict[tuple[str, str], _TokenChannel] = {}


class Pkcs11Hsm:
    """RS256 signer and RSA key generator on one PKCS#11 token (a ``Signer``).

    Cheap to create; the first use logs in. Instances on the same module and
    token share one session, so they must share the PIN too.
    """

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        # Keyed by realpath: two spellings of one library are one library,
        # with one login state.
        channel_key = (os.path.realpath(config.module), config.token_label)
        with _PKCS11_LOCK:
            channel = _CHANNELS.get(channel_key)
            if channel is None:
                channel = _CHANNELS[channel_key] = _TokenChannel(config.module, config.token_label)
            self._channel = channel
        self._attached = False
        self._executor_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"Pkcs11Hsm({self._channel.where})"

    def __enter__(self) -> Pkcs11Hsm:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- lifecycle ------------------------------------------------------------

    def open(self) -> None:
        """Log in now (instead of on first use), to fail fast at startup."""
        with _PKCS11_LOCK:
            self._attach()

    def close(self) -> None:
        """Stop this instance's worker thread and release its share of the
        session; the last instance on a token logs out and closes it."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with _PKCS11_LOCK:
            if self._attached:
                self._attached = False
                self._channel.users -= 1
                if self._channel.users == 0:
                    self._channel.drop()

    async def aclose(self) -> None:
        """close() without blocking the event loop."""
        # Not on our own executor: close() waits for that executor to drain.
        await asyncio.to_thread(self.close)

    # --- keys -----------------------------------------------------------------

    def generate_rsa_keypair(self, tenant: str, bits: int | None = None) -> GeneratedKey:
        """Create a non-extractable RSA key pair for tenant inside the token.

        bits defaults to the configured key_size. Both halves end up labelled
        f"fedtoken/{tenant}/{kid}" with CKA_ID = kid, kid being the RFC 7638
        thumbprint of the public key.
        """
        bits = self._config.key_size if bits is None else bits
        _check_bits(bits)
        if not tenant or "/" in tenant or not tenant.isprintable():
            raise InvalidRequest(
                "tenant must be non-empty and printable, without '/'", field="tenant"
            )

        def generate(channel: _TokenChannel) -> GeneratedKey:
            public, private = channel.session().generate_keypair(
                KeyType.RSA,
                bits,
                label=f"{_PENDING_PREFIX}{tenant}/{secrets.token_hex(8)}",
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template=_PUBLIC_TEMPLATE,
                private_template=_PRIVATE_TEMPLATE,
            )
            try:
                _require_protected(channel, private)
                n, e = _rsa_numbers(public)
                kid = rsa_thumbprint(n, e)
                label = f"{LABEL_PREFIX}{tenant}/{kid}"
                # The private key is renamed last: a private key under the
                # final label is always complete.
                for obj in (public, private):
                    obj[Attribute.ID] = kid.encode("ascii")
                    obj[Attribute.LABEL] = label
            except (PKCS11Error, HsmUnavailable):
                # Best effort; if the session died, the pending label marks
                # the leftovers as never used.
                for obj in (private, public):
                    with contextlib.suppress(PKCS11Error):
                        obj.destroy()
                raise
            return GeneratedKey(
                kid=kid, hsm_label=label, public_jwk=rsa_public_jwk(n, e), key_size=n.bit_length()
            )

        generated = self._call("generate an RSA key pair", generate)
        _log.info("generated RSA-%d key %s in %s", bits, generated.hsm_label, self._channel.where)
        return generated

    def sign_many(self, hsm_label: str, kid: str, inputs: Sequence[bytes]) -> list[bytes]:
        """RS256 signatures, one per input, by the HSM key with this label and kid.

        The whole batch holds the lock once. A missing key raises
        HsmUnavailable: there is no other key to fall back to.
        """
        _check_label(hsm_label)

        def sign(channel: _TokenChannel) -> list[bytes]:
            key = channel.private_key(hsm_label, kid)
            return [bytes(key.sign(data, mechanism=_RS256)) for data in inputs]

        return self._call("sign", sign)

    def public_jwk(self, hsm_label: str) -> dict[str, Any]:
        """The public JWK of a key pair, read back from the token."""
        _check_label(hsm_label)

        def read(channel: _TokenChannel) -> dict[str, Any]:
            n, e = _rsa_numbers(channel.find_key(ObjectClass.PUBLIC_KEY, hsm_label))
            return rsa_public_jwk(n, e)

        return self._call("read a public key", read)

    def list_labels(self) -> list[str]:
        """Labels of the fedtoken private keys in the token, sorted."""

        def read_labels(channel: _TokenChannel) -> list[str]:
            objects = channel.session().get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA}
            )
            labels = (str(obj[Attribute.LABEL]) for obj in objects)
            return sorted(label for label in labels if label.startswith(LABEL_PREFIX))

        return self._call("list keys", read_labels)

    def destroy_key(self, hsm_label: str) -> None:
        """Destroy both halves of a key pair.

        Idempotent, so an interrupted key destruction can simply be repeated.
        """
        _check_label(hsm_label)

        def destroy(channel: _TokenChannel) -> None:
            channel.forget(hsm_label)
            session = channel.session()
            # Private half first: once it is gone nothing can sign.
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                # list(): finish the search before destroying what it found.
                found = list(
                    session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: hsm_label})
                )
                for obj in found:
                    obj.destroy()

        self._call("destroy a key", destroy)
        _log.info("destroyed key %s in %s", hsm_label, self._channel.where)

    def private_key_attributes(self, hsm_label: str) -> dict[str, bool]:
        """The protection attributes of a private key as the token reports them,
        so tests and audits can show it never was, and cannot be, exported."""
        _check_label(hsm_label)
        return self._call(
            "read key attributes",
            lambda channel: _protection(channel.find_key(ObjectClass.PRIVATE_KEY, hsm_label)),
        )

    # --- async: run on this instance's one PKCS#11 thread -------------------------

    async def asign_many(self, hsm_label: str, kid: str, inputs: Sequence[bytes]) -> list[bytes]:
        """sign_many on this instance's PKCS#11 thread."""
        # tuple(): the caller may reuse its list while the worker signs.
        return await self._offload(functools.partial(self.sign_many, hsm_label, kid, tuple(inputs)))

    async def agenerate_rsa_keypair(self, tenant: str, bits: int | None = None) -> GeneratedKey:
        """generate_rsa_keypair on this instance's PKCS#11 thread."""
        return await self._offload(functools.partial(self.generate_rsa_keypair, tenant, bits))

    async def adestroy_key(self, hsm_label: str) -> None:
        """destroy_key on this instance's PKCS#11 thread."""
        await self._offload(functools.partial(self.destroy_key, hsm_label))

    async def _offload(self, call: Callable[[], T]) -> T:
        # The worker, not the event loop, waits for _PKCS11_LOCK; python-pkcs11
        # releases the GIL inside PKCS#11 calls, so the loop keeps running.
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
            executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    # --- internals ------------------------------------------------------------

    def _attach(self) -> _TokenChannel:
        """Join the shared session (logging in if nobody has). Lock held."""
        channel = self._channel
        if not self._attached:
            if channel.users == 0:
                channel.pin = self._config.pin
            elif not hmac.compare_digest(channel.pin.encode(), self._config.pin.encode()):
                raise HsmUnavailable(
                    f"{channel.where}: this process is already logged in with a different "
                    "PIN; every configuration of one token must use the same PIN"
                )
            channel.session()
            channel.users += 1
            self._attached = True
        return channel

    def _call(self, what: str, operation: Callable[[_TokenChannel], T]) -> T:
        """Run operation under the process-wide lock, translating PKCS#11 errors;
        after a lost session, log in again and retry exactly once."""
        with _PKCS11_LOCK:
            channel = self._attach()
            try:
                return operation(channel)
            except _SESSION_LOST as exc:
                _log.warning(
                    "%s: lost the session while trying to %s (%s); logging in again",
                    channel.where,
                    what,
                    _name(exc),
                )
                channel.drop()
            except PKCS11Error as exc:
                raise HsmUnavailable(f"{channel.where}: failed to {what} ({_name(exc)})") from exc
            try:
                return operation(channel)
            except PKCS11Error as exc:
                raise HsmUnavailable(
                    f"{channel.where}: failed to {what} even after logging in again ({_name(exc)})"
                ) from exc


def _check_bits(bits: int) -> None:
    if bits < MIN_RSA_BITS:
        raise PolicyViolation(
            f"RSA keys must have at least {MIN_RSA_BITS} bits, not {bits}", field="key_size"
        )


def _check_label(hsm_label: str) -> None:
    if not hsm_label.startswith(LABEL_PREFIX):
        raise InvalidRequest(
            f"HSM label must start with {LABEL_PREFIX!r}: fedtoken uses no other keys",
            field="hsm_label",
        )


def _rsa_numbers(public_key: Any) -> tuple[int, int]:
    values = public_key.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
    return (
        int.from_bytes(values[Attribute.MODULUS], "big"),
        int.from_bytes(values[Attribute.PUBLIC_EXPONENT], "big"),
    )


def _protection(private_key: Any) -> dict[str, bool]:
    values = private_key.get_attributes(list(_REQUIRED_PRIVATE))
    return {attr.name: bool(values[attr]) for attr in _REQUIRED_PRIVATE}


def _require_protected(channel: _TokenChannel, private_key: Any) -> None:
    """Refuse a key the token created weaker than the template asked: a token
    may silently ignore attributes, and an extractable key is not ours to use."""
    actual = _protection(private_key)
    wrong = sorted(
        attr.name for attr, want in _REQUIRED_PRIVATE.items() if actual[attr.name] != want
    )
    if wrong:
        raise HsmUnavailable(
            f"{channel.where}: the token created a key without the required "
            f"protection ({', '.join(wrong)}); the key was destroyed"
        )


def _name(exc: BaseException) -> str:
    """PKCS#11 errors are identified by their class (the CKR_ code); their
    text adds nothing an operator needs."""
    return type(exc).__name__
