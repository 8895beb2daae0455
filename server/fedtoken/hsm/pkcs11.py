"""PKCS#11 signing: RSA keys are generated and used inside the HSM, never outside.

``Pkcs11Hsm`` implements the ``fedtoken.core.ports.Signer`` port on one
token. How PKCS#11 calls are kept apart, and how the process shares one
login per token, is ``fedtoken.hsm.session``'s job; in short:

* Never two threads in the PKCS#11 library at once in one process: every
  call, sync or async, from any instance, runs with the process-wide lock
  ``session.PKCS11_LOCK`` held. That lock is the whole serialisation.
* The async methods (the ``Signer`` and ``CheckpointSigner`` ports) run their call on
  this instance's single-worker executor, so the worker thread, not the
  event loop, waits for the lock (python-pkcs11 releases the GIL inside
  PKCS#11 calls, so the loop keeps running meanwhile). Two instances have
  two worker threads, which take turns on the lock.

There is no software fallback: if the token cannot sign, nothing is signed.
After an HSM outage the process heals by itself (the session module logs in
again and re-initialises the library, rate limited). The PIN is never logged
and never put in an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error

from fedtoken.core.checkpoint import CHECKPOINT_LABEL_PREFIX
from fedtoken.core.errors import HsmUnavailable, InvalidRequest
from fedtoken.core.jwk import rsa_public_jwk, rsa_thumbprint
from fedtoken.core.policy import check_key_size
from fedtoken.core.ports import GeneratedKey, HsmKeyAttributes
from fedtoken.hsm.session import PKCS11_LOCK, TokenChannel, channel_for
from fedtoken.ops import metrics

if TYPE_CHECKING:
    from fedtoken.core.ports import CheckpointSigner, Signer

__all__ = ["LABEL_PREFIX", "HsmConfig", "Pkcs11Hsm"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

# Labels of complete fedtoken key pairs: f"fedtoken/{tenant}/{kid}". Only
# objects under this prefix are ever listed, used or destroyed, so fedtoken
# cannot touch other applications' keys on a shared HSM.
LABEL_PREFIX = "fedtoken/"
# A freshly generated pair carries this prefix until its kid is known; one
# left behind by a crash is not listed and never signs.
_PENDING_PREFIX = "fedtoken-pending/"

# The audit checkpoint key (fedtoken.core.checkpoint): one per token.
CHECKPOINT_KEY_BITS = 2048

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


@dataclass(frozen=True)
class HsmConfig:
    """Where the signing keys live and how to log in to them."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    key_size: int = 2048

    def __post_init__(self) -> None:
        check_key_size(self.key_size)


class Pkcs11Hsm:
    """RS256 signer and RSA key generator on one PKCS#11 token (a ``Signer``).

    Cheap to create; the first use logs in. Instances on the same module and
    token share one session, so they must share the PIN too.
    """

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        self._channel = channel_for(config.module, config.token_label)
        self._attached = False  # guarded by PKCS11_LOCK
        self._executor_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        # Concurrent sign() calls, per (label, kid): queued inputs and the task
        # that hands them to the worker thread batch by batch (event loop only).
        self._sign_queue: dict[tuple[str, str], list[tuple[tuple[bytes, ...],
                                                           asyncio.Future[list[bytes]]]]] = {}
        self._sign_runners: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.sign_batches = 0  # worker hops for sign(); calls / this = batch size

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
        with PKCS11_LOCK:
            self._attach()

    def close(self) -> None:
        """Stop this instance's worker thread (after the calls queued on it)
        and release its share of the session; the last instance on a token
        logs out and closes it."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with PKCS11_LOCK:
            if self._attached:
                self._attached = False
                self._channel.leave()

    async def aclose(self) -> None:
        """close() without blocking the event loop."""
        # Not on our own executor: close() waits for that executor to drain.
        await asyncio.to_thread(self.close)

    # --- the Signer port: async, on this instance's worker thread ---------------

    async def sign(self, hsm_label: str, kid: str, inputs: Sequence[bytes]) -> list[bytes]:
        """sign_many on this instance's worker thread, batched with concurrent calls.

        Calls for the same key that wait at the same time go to the HSM as one
        sign_many (one hop to the worker thread, one turn of the lock): while
        a batch is being signed, later calls for that key queue for the next
        one. Each caller gets its own signatures, in its order; if a batch
        fails, every call in it fails with the same error.
        """
        _check_label(hsm_label)
        if not inputs:
            return []
        # tuple(): the caller may reuse its list while the worker signs.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bytes]] = loop.create_future()
        key = (hsm_label, kid)
        self._sign_queue.setdefault(key, []).append((tuple(inputs), future))
        runner = self._sign_runners.get(key)
        if runner is None or runner.done() or runner.get_loop() is not loop:
            self._sign_runners[key] = asyncio.create_task(
                self._run_sign_batches(key), name="pkcs11-sign-batches")
        return await asyncio.shield(future)

    async def _run_sign_batches(self, key: tuple[str, str]) -> None:
        """Sign what is queued for one key, a batch per worker hop, until none is left."""
        while batch := self._sign_queue.pop(key, []):
            flat = tuple(data for inputs, _ in batch for data in inputs)
            try:
                signatures = await self._offload(
                    functools.partial(self.sign_many, key[0], key[1], flat))
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.sign_batches += 1
            at = 0
            for inputs, future in batch:
                if not future.done():
                    future.set_result(signatures[at:at + len(inputs)])
                at += len(inputs)

    async def generate(self, tenant: str, bits: int) -> GeneratedKey:
        """generate_rsa_keypair on this instance's worker thread."""
        return await self._offload(functools.partial(self.generate_rsa_keypair, tenant, bits))

    async def destroy(self, hsm_label: str) -> None:
        """destroy_key on this instance's worker thread."""
        await self._offload(functools.partial(self.destroy_key, hsm_label))

    async def destroy_private(self, hsm_label: str) -> None:
        """destroy_private_key on this instance's worker thread."""
        await self._offload(functools.partial(self.destroy_private_key, hsm_label))

    async def key_labels(self) -> list[str]:
        """all_key_labels on this instance's worker thread."""
        return await self._offload(self.all_key_labels)

    async def key_attributes(self, hsm_label: str) -> HsmKeyAttributes:
        """read_key_attributes on this instance's worker thread."""
        return await self._offload(functools.partial(self.read_key_attributes, hsm_label))

    # --- the CheckpointSigner port: the audit checkpoint key ---------------------

    async def checkpoint_key(self, *, create: bool = True) -> GeneratedKey | None:
        """find_checkpoint_key on this instance's worker thread."""
        return await self._offload(functools.partial(self.find_checkpoint_key, create=create))

    async def sign_checkpoint(self, hsm_label: str, kid: str, data: bytes) -> bytes:
        """sign_with_checkpoint_key on this instance's worker thread."""
        return await self._offload(
            functools.partial(self.sign_with_checkpoint_key, hsm_label, kid, bytes(data)))

    async def _offload(self, call: Callable[[], T]) -> T:
        # One worker per instance: it, not the event loop, waits for
        # PKCS11_LOCK. The lock, not this executor, is what keeps PKCS#11
        # calls apart (sync callers and other instances take it too).
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
            executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    # --- sync: on the calling thread, under PKCS11_LOCK -----------------------

    def generate_rsa_keypair(self, tenant: str, bits: int | None = None) -> GeneratedKey:
        """Create a non-extractable RSA key pair for tenant inside the token.

        bits defaults to the configured key_size. Both halves end up labelled
        f"fedtoken/{tenant}/{kid}" with CKA_ID = kid, kid being the RFC 7638
        thumbprint of the public key.
        """
        bits = check_key_size(self._config.key_size if bits is None else bits)
        if not tenant or "/" in tenant or not tenant.isprintable():
            raise InvalidRequest(
                "tenant must be non-empty and printable, without '/'", field="tenant"
            )

        generated = self._generate_pair(
            f"{_PENDING_PREFIX}{tenant}/{secrets.token_hex(8)}", bits,
            lambda kid: f"{LABEL_PREFIX}{tenant}/{kid}")
        _log.info("generated RSA-%d key %s in %s", bits, generated.hsm_label, self._channel.where)
        return generated

    def _generate_pair(self, pending_label: str, bits: int,
                       final_label: Callable[[str], str]) -> GeneratedKey:
        """A protected key pair under ``pending_label``, renamed to
        ``final_label(kid)`` once its kid (thumbprint) is known."""

        def generate(channel: TokenChannel) -> GeneratedKey:
            public, private = channel.session().generate_keypair(
                KeyType.RSA,
                bits,
                label=pending_label,
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template=_PUBLIC_TEMPLATE,
                private_template=_PRIVATE_TEMPLATE,
            )
            try:
                _require_protected(channel, private)
                n, e = _rsa_numbers(public)
                kid = rsa_thumbprint(n, e)
                label = final_label(kid)
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

        return self._call("generate an RSA key pair", generate)

    def sign_many(self, hsm_label: str, kid: str, inputs: Sequence[bytes]) -> list[bytes]:
        """RS256 signatures, one per input, by the HSM key with this label and kid.

        The whole batch holds the lock once. A missing key raises
        HsmUnavailable: there is no other key to fall back to.
        """
        _check_label(hsm_label)

        def sign(channel: TokenChannel) -> list[bytes]:
            key = channel.private_key(hsm_label, kid)
            out = []
            for data in inputs:
                # Timed per C_Sign: the batch is one lock turn, not one call.
                started = time.perf_counter()
                out.append(bytes(key.sign(data, mechanism=_RS256)))
                metrics.observe_hsm_sign(time.perf_counter() - started)
            return out

        try:
            return self._call("sign", sign)
        except Exception:
            metrics.observe_hsm_error()
            raise

    def public_jwk(self, hsm_label: str) -> dict[str, Any]:
        """The public JWK of a key pair, read back from the token."""
        _check_label(hsm_label)

        def read(channel: TokenChannel) -> dict[str, Any]:
            n, e = _rsa_numbers(channel.find_key(ObjectClass.PUBLIC_KEY, hsm_label))
            return rsa_public_jwk(n, e)

        return self._call("read a public key", read)

    def list_labels(self) -> list[str]:
        """Labels of the fedtoken private keys in the token, sorted."""

        def read_labels(channel: TokenChannel) -> list[str]:
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

        def destroy(channel: TokenChannel) -> None:
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

    def destroy_private_key(self, hsm_label: str) -> None:
        """Destroy the private half only (nothing can sign with it again; the
        public half stays). Idempotent."""
        _check_label(hsm_label)

        def destroy(channel: TokenChannel) -> None:
            channel.forget(hsm_label)
            found = list(channel.session().get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: hsm_label}))
            for obj in found:
                obj.destroy()

        self._call("destroy a private key", destroy)
        _log.info("destroyed the private key %s in %s", hsm_label, self._channel.where)

    def all_key_labels(self) -> list[str]:
        """Labels of every fedtoken tenant key object (either half), sorted."""

        def read_labels(channel: TokenChannel) -> list[str]:
            labels: set[str] = set()
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for obj in channel.session().get_objects({Attribute.CLASS: object_class}):
                    label = str(obj[Attribute.LABEL])
                    if label.startswith(LABEL_PREFIX):
                        labels.add(label)
            return sorted(labels)

        return self._call("list key objects", read_labels)

    def read_key_attributes(self, hsm_label: str) -> HsmKeyAttributes:
        """The private key's protection as the token reports it now
        (present=False when the token has no such private key)."""
        _check_label(hsm_label)

        def read(channel: TokenChannel) -> HsmKeyAttributes:
            found = list(channel.session().get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: hsm_label}))
            if not found:
                return HsmKeyAttributes(present=False)
            attrs = [Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.SIGN,
                     Attribute.DECRYPT, Attribute.UNWRAP, Attribute.NEVER_EXTRACTABLE,
                     Attribute.ALWAYS_SENSITIVE]
            values = found[0].get_attributes(attrs)
            return HsmKeyAttributes(
                present=True, sensitive=bool(values[Attribute.SENSITIVE]),
                extractable=bool(values[Attribute.EXTRACTABLE]),
                sign=bool(values[Attribute.SIGN]), decrypt=bool(values[Attribute.DECRYPT]),
                unwrap=bool(values[Attribute.UNWRAP]),
                never_extractable=bool(values[Attribute.NEVER_EXTRACTABLE]),
                always_sensitive=bool(values[Attribute.ALWAYS_SENSITIVE]))

        return self._call("read key attributes", read)

    # --- the audit checkpoint key: sync, under PKCS11_LOCK ---------------------

    def checkpoint_key_labels(self) -> list[str]:
        """Labels of the audit checkpoint private keys in the token, sorted."""

        def read_labels(channel: TokenChannel) -> list[str]:
            objects = channel.session().get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA}
            )
            labels = (str(obj[Attribute.LABEL]) for obj in objects)
            return sorted(label for label in labels if label.startswith(CHECKPOINT_LABEL_PREFIX))

        return self._call("list checkpoint keys", read_labels)

    def find_checkpoint_key(self, *, create: bool = True) -> GeneratedKey | None:
        """The audit checkpoint key: RSA-2048 labelled
        f"{CHECKPOINT_LABEL_PREFIX}{kid}" (CKA_ID = kid), with the same
        protection as tenant keys. Generated when the token has none and
        ``create``; with several, the first label in sorted order (every
        process picks the same one). Never a tenant key: the prefixes differ
        and neither path accepts the other's labels."""
        labels = self.checkpoint_key_labels()
        if not labels:
            if not create:
                return None
            generated = self._generate_pair(
                f"{_PENDING_PREFIX}{CHECKPOINT_LABEL_PREFIX}{secrets.token_hex(8)}",
                CHECKPOINT_KEY_BITS, lambda kid: f"{CHECKPOINT_LABEL_PREFIX}{kid}")
            _log.info("generated RSA-%d audit checkpoint key %s in %s", CHECKPOINT_KEY_BITS,
                      generated.hsm_label, self._channel.where)
            labels = self.checkpoint_key_labels()
        if len(labels) > 1:
            _log.warning("%d audit checkpoint keys in %s; using %s", len(labels),
                         self._channel.where, labels[0])
        label = labels[0]
        kid = label[len(CHECKPOINT_LABEL_PREFIX):]

        def read(channel: TokenChannel) -> tuple[int, int]:
            # The pair whose CKA_ID is the kid the label names, both halves,
            # and a private half that never was and cannot be exported.
            actual = _protection(channel.private_key(label, kid))
            weak = sorted(attr.name for attr, want in _REQUIRED_PRIVATE.items()
                          if actual[attr.name] != want)
            if weak:
                raise HsmUnavailable(f"{channel.where}: checkpoint key {label!r} lacks the "
                                     f"required protection ({', '.join(weak)}); not used")
            return _rsa_numbers(channel.find_key(ObjectClass.PUBLIC_KEY, label, kid))

        n, e = self._call("read the checkpoint key", read)
        jwk = rsa_public_jwk(n, e)
        if jwk["kid"] != kid:
            raise HsmUnavailable(f"{self._channel.where}: checkpoint key {label!r} does not "
                                 "carry its public key's thumbprint; refusing to use it")
        return GeneratedKey(kid=kid, hsm_label=label, public_jwk=jwk, key_size=n.bit_length())

    def sign_with_checkpoint_key(self, hsm_label: str, kid: str, data: bytes) -> bytes:
        """RS256 signature of ``data`` by the checkpoint key with this label and kid."""
        if not hsm_label.startswith(CHECKPOINT_LABEL_PREFIX):
            raise InvalidRequest(
                f"checkpoint key labels start with {CHECKPOINT_LABEL_PREFIX!r}; "
                "a tenant key never signs a checkpoint", field="hsm_label")

        def sign(channel: TokenChannel) -> bytes:
            return bytes(channel.private_key(hsm_label, kid).sign(data, mechanism=_RS256))

        return self._call("sign an audit checkpoint", sign)

    def private_key_attributes(self, hsm_label: str) -> dict[str, bool]:
        """The protection attributes of a private key as the token reports them,
        so tests and audits can show it never was, and cannot be, exported."""
        _check_label(hsm_label)
        return self._call(
            "read key attributes",
            lambda channel: _protection(channel.find_key(ObjectClass.PRIVATE_KEY, hsm_label)),
        )

    # --- internals ------------------------------------------------------------

    def _attach(self) -> TokenChannel:
        """Join the shared session (logging in if nobody has). Lock held."""
        if not self._attached:
            self._channel.join(self._config.pin)
            self._attached = True
        return self._channel

    def _call(self, what: str, operation: Callable[[TokenChannel], T]) -> T:
        """Run operation on this token with PKCS11_LOCK held (on the calling
        thread), with the channel's error translation and recovery (log in
        again, re-initialise the library; see fedtoken.hsm.session)."""
        with PKCS11_LOCK:
            return self._attach().run(what, operation)


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


def _require_protected(channel: TokenChannel, private_key: Any) -> None:
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


if TYPE_CHECKING:

    def _implements(hsm: Pkcs11Hsm) -> Signer:
        return hsm  # mypy checks the port

    def _implements_checkpoints(hsm: Pkcs11Hsm) -> CheckpointSigner:
        return hsm
