"""The engine's optional native fast path: loading ``fedtoken._native``, the
table of header segments it may take, and turning its answers into verdicts.

The extension (built by setup.py when a compiler and the OpenSSL headers are
present) does the split, the strict base64url decoding and the RS256
verification of a run of tokens in C with the GIL released, for tokens whose
exact header segment the Python path has already seen verify under a known
key. Everything else stays in Python: header policy (the table holds only
header segments the engine vetted), the payload JSON, issuer and key
selection (a native result counts only if the key the resolver selects for
the token IS the key the native code used; otherwise the token takes the
Python path), claims and revocation. Any token the native code does not fully
understand is handed back to the Python path.

Threads: ``fedtoken._native.KeyTable`` is immutable (its ``verify`` keeps its
state per call), so any number of verify threads may use one at once. What
changes is which table is current; see ``NativePath``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedtoken.core.claims import check_claims
from fedtoken.core.jose import loads_strict
from fedtoken.core.model import (
    FOREIGN_SEPARATOR,
    MAX_RSA_BITS,
    Expectation,
    Reason,
    Verdict,
    WireBatch,
)
from fedtoken.core.ports import VerificationKey
from fedtoken.verifier._shared import MALFORMED, PARSE_ERRORS, log, log_unexpected

__all__ = [
    "NATIVE",
    "NATIVE_AVAILABLE",
    "NATIVE_SLOTS",
    "PIPELINE_REASONS",
    "NativePath",
    "NativeSnapshot",
    "WireBatch",
    "pb_string_fields",
    "rsa_path",
]

# Header segments (with their key) the native path may take; a power of
# headers far beyond what real issuers use, and under the native limit of 127.
NATIVE_SLOTS: Final = 64
# Status bytes of fedtoken._native.KeyTable.verify.
FALLBACK: Final = 0
INVALID: Final = 0x80
_ALG: Final = "RS256"
# Results of fedtoken._native.check_claims, by index (-1: undecided).
CLAIM_REASONS: Final = (
    None,
    Reason.MISSING_CLAIM,
    Reason.INVALID_CLAIM,
    Reason.EXPIRED,
    Reason.NOT_YET_VALID,
    Reason.ISSUED_IN_FUTURE,
    Reason.AUDIENCE_MISMATCH,
)
_MAX_BITS: Final = MAX_RSA_BITS
# The reasons fedtoken._native.KeyTable.pipeline decides, by index (the
# RS_* constants of pipeline.h).
PIPELINE_REASONS: Final = (
    Reason.OK,
    Reason.MISSING_CLAIM,
    Reason.INVALID_CLAIM,
    Reason.EXPIRED,
    Reason.NOT_YET_VALID,
    Reason.ISSUED_IN_FUTURE,
    Reason.AUDIENCE_MISMATCH,
    Reason.REVOKED,
    Reason.BAD_SIGNATURE,
)
# Longest kid an audit entry carries unchanged (audit.rows.MAX_ITEM_CHARS).
_MAX_AUDIT_KID: Final = 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def pb_string_fields(*fields: tuple[int, str]) -> bytes:
    """The protobuf encoding of proto3 string fields (field number, value),
    in the order given; an empty string is omitted, as proto3 does."""
    out = bytearray()
    for number, value in fields:
        raw = value.encode("utf-8", "surrogatepass")
        if raw:
            out += _varint(number << 3 | 2) + _varint(len(raw)) + raw
    return bytes(out)


def _load_native() -> Any:
    try:
        module = importlib.import_module("fedtoken._native")
    except ImportError:
        return None
    # Without the built extension, the directory of its C sources imports
    # as an empty namespace package.
    return module if hasattr(module, "KeyTable") else None


# The compiled fast path, or None when it was not built (verdicts are the
# same either way; only the speed differs).
NATIVE: Final[Any] = _load_native()
NATIVE_AVAILABLE: Final = NATIVE is not None


def rsa_path() -> str:
    """Which RSA implementation verifies RS256 signatures in the batch path,
    decided once per process (for the startup log, the bench header and
    metrics): "multi-buffer (crypto_mb AVX-512 IFMA)", or "OpenSSL (<why>)"."""
    from fedtoken.verifier import multibuffer

    if NATIVE is None:
        return "OpenSSL via cryptography (native fast path not built)"
    if multibuffer.available():
        return f"multi-buffer ({multibuffer.status()})"
    return f"OpenSSL ({multibuffer.status()})"

# (alg, kid, key): what a native status byte's slot stands for.
Slot = tuple[str, str, VerificationKey]
Resolved = Verdict | tuple[VerificationKey, str, str]
Resolve = Callable[[dict[str, Any], str, str, Expectation], Resolved]
Conclude = Callable[[Reason | None, dict[str, Any], bytes, str, str, str, bool], Verdict]
# What one KeyTable.verify call answers: statuses, payloads, scanned claims.
Part = tuple[bytes, list[bytes | None], list[dict[str, Any] | None]]


@dataclass(frozen=True, slots=True)
class NativeSnapshot:
    """One native KeyTable and the slot each of its statuses names; built
    together and never changed, so a status always indexes these slots."""

    table: Any  # fedtoken._native.KeyTable
    slots: tuple[Slot, ...]


class NativePath:
    """The native fast path of one engine.

    Mutable state, all of it changed only under ``_lock``: ``_entries``
    (header segment -> slot and the key's DER, learned from tokens the Python
    path verified, on any verify thread), ``_version`` (bumped by every change
    of ``_entries``) and ``_snapshot`` with the ``_built`` version it was made
    from. Readers never take the lock to verify: a call or batch takes one
    ``snapshot()`` and uses it throughout. A snapshot that is not the newest
    is still correct (only slower): every native answer is checked against
    the key the resolver selects now, so an entry whose key was withdrawn or
    replaced gives the resolver's verdict or goes to the Python path.
    """

    def __init__(
        self,
        *,
        max_token_size: int,
        leeway: int,
        header_of: Callable[[bytes], tuple[str, str] | None],
        resolve: Resolve,
        conclude: Conclude,
    ) -> None:
        if NATIVE is None:
            raise ImportError("fedtoken._native is not built")
        self._max_token_size = max_token_size
        self._leeway = leeway
        self._header_of = header_of
        self._resolve = resolve
        self._conclude = conclude
        self._lock = threading.Lock()
        self._entries: dict[bytes, tuple[Slot, bytes]] = {}
        self._version = 0
        self._built = 0
        self._snapshot: NativeSnapshot | None = None

    # --- the table ------------------------------------------------------------

    def snapshot(self) -> NativeSnapshot | None:
        """The current table, rebuilt first if entries were learned since.

        None while nothing is learned. Never waits: when another thread holds
        the lock, the previous snapshot is returned.
        """
        if self._built == self._version:
            return self._snapshot
        if not self._lock.acquire(blocking=False):
            return self._snapshot
        try:
            if self._built != self._version:
                self._snapshot = self._build()
                self._built = self._version
            return self._snapshot
        finally:
            self._lock.release()

    def _build(self) -> NativeSnapshot | None:
        """A new snapshot of ``_entries``. Lock held."""
        if not self._entries:
            return None
        entries = list(self._entries.items())
        try:
            table = NATIVE.KeyTable([(h, der) for h, (_, der) in entries], self._max_token_size)
        except ValueError:  # pragma: no cover - keys are vetted in learn
            log.exception("native key table refused; using the Python path")
            self._entries.clear()
            return None
        return NativeSnapshot(table, tuple(slot for _, (slot, _) in entries))

    def learn(self, signing_input: bytes, key: VerificationKey) -> None:
        """Table the header segment of a token that verified under ``key``."""
        if (
            key.alg != _ALG
            or not isinstance(key.public_key, RSAPublicKey)
            or key.public_key.key_size > _MAX_BITS
        ):
            return
        header = signing_input[: signing_input.index(b".")]
        # Unlocked read for the common case (already tabled with this key):
        # a dict lookup is atomic, and a stale answer only means the locked
        # check below runs.
        known = self._entries.get(header)
        if known is not None and known[0][2] is key:
            return
        parsed = self._header_of(header)
        if parsed is None or parsed[0] != key.alg:
            return
        der = key.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        with self._lock:
            entries = self._entries
            known = entries.get(header)
            if known is not None and known[0][2] is key:
                return
            if known is None and len(entries) >= NATIVE_SLOTS:
                entries.clear()
            entries[header] = ((parsed[0], parsed[1], key), der)
            self._version += 1

    # --- the pipeline ----------------------------------------------------------

    def plan(
        self,
        slots: tuple[Slot, ...],
        expect: Expectation,
        allowed: frozenset[str] | None,
        revoked_keys: Any,
        digest_prefix: Callable[[str], bytes],
    ) -> tuple[Any, ...] | None:
        """The per-slot plan of KeyTable.pipeline for one call, or None when
        no slot may be decided natively.

        A slot is planned only when the resolver, for the slot key's own
        issuer under this expectation, selects that very RS256 key (ours, or
        a trusted issuer's for the tenant the caller names), the caller may
        see that tenant's verdicts, and the key is not revoked: then, for a
        token whose iss is that issuer, everything the Python path would
        check before the claims is already known. Any other slot's tokens
        take the Python path.
        """
        plans: list[Any] = []
        any_on = False
        for alg, kid, key in slots:
            plan = None
            if alg == _ALG and key.issuer:
                resolved = self._resolve({"iss": key.issuer}, alg, kid, expect)
                if type(resolved) is not Verdict:
                    rkey, tenant, iss = resolved  # type: ignore[misc]
                    # A trusted foreign issuer's revocations are kept under
                    # "iss<US>value" in the trusting tenant (core.model.foreign_ref).
                    ref = f"{iss}{FOREIGN_SEPARATOR}" if key.foreign else ""
                    if (rkey is key and iss == key.issuer and tenant
                            and (allowed is None or tenant in allowed)
                            and f"{ref}{key.kid}" not in revoked_keys
                            and key.kid.isascii() and key.kid.isprintable()
                            and len(key.kid) <= _MAX_AUDIT_KID):
                        plan = (
                            iss.encode("utf-8", "surrogatepass"),
                            pb_string_fields((3, tenant), (4, iss), (5, key.kid)),
                            digest_prefix(tenant),
                            tenant,
                            key.kid,
                            ref.encode("utf-8", "surrogatepass"),
                            key.foreign,
                        )
                        any_on = True
            plans.append(plan)
        return tuple(plans) if any_on else None

    # --- verdicts -------------------------------------------------------------

    def finish_all(
        self,
        tokens: Sequence[str],
        parts: Sequence[Part],
        slots: tuple[Slot, ...],
        expect: Expectation,
        now: float,
    ) -> tuple[list[Verdict | None], list[int]]:
        """Verdicts of the tokens the native code checked; None, and the
        index in the second list, for every token the Python path must take.
        ``slots`` must be those of the snapshot whose table made ``parts``."""
        verdicts: list[Verdict | None] = []
        append = verdicts.append
        rest: list[int] = []
        audience = expect.audience if expect.check_audience else None
        verdict_of = self._verdict
        # (iss, slot) -> what resolve answered: it depends on nothing else
        # but the resolver's state, and within one call the state the first
        # lookup saw stands for the call (it may be replaced meanwhile; a
        # verdict reflects a state that was current during the call).
        memo: dict[tuple[str, int], Resolved] = {}
        index = 0
        for statuses, payloads, claims in parts:
            for status, payload_bytes, payload in zip(statuses, payloads, claims, strict=True):
                verdict = None
                if status != FALLBACK:
                    try:
                        verdict = verdict_of(
                            status, payload_bytes, payload, slots, expect, audience, now, memo  # type: ignore[arg-type]
                        )
                    except Exception as exc:  # noqa: BLE001 - one token must never fail the batch
                        log_unexpected(exc)
                        verdict = MALFORMED
                if verdict is None:
                    rest.append(index)
                append(verdict)
                index += 1
        if index != len(tokens):  # pragma: no cover - the C code answers every token
            raise RuntimeError("native verify answered a different number of tokens")
        return verdicts, rest

    def _verdict(
        self,
        status: int,
        payload_bytes: bytes,
        payload: dict[str, Any] | None,
        slots: tuple[Slot, ...],
        expect: Expectation,
        audience: str | None,
        now: float,
        memo: dict[tuple[str, int], Resolved],
    ) -> Verdict | None:
        """The verdict on a token whose header, base64url and signature the
        native code checked against ``slots[status & 0x7F - 1]``; None when
        the key this token must be checked with is another one.

        ``payload`` is the native scanner's parse of a flat payload (what
        loads_strict returns for it), or None: then loads_strict decides.
        """
        slot = status & 0x7F
        alg, kid, slot_key = slots[slot - 1]
        # As the cached-header branch of the engine's _precheck, from the
        # decoded payload.
        scanned = payload is not None
        if payload is None:
            try:
                payload = loads_strict(payload_bytes)
            except PARSE_ERRORS:
                return MALFORMED
            if type(payload) is not dict:
                return MALFORMED
        iss = payload.get("iss")
        if type(iss) is str:
            memo_key = (iss, slot)
            resolved = memo.get(memo_key)
            if resolved is None:
                resolved = memo[memo_key] = self._resolve(payload, alg, kid, expect)
        else:
            resolved = self._resolve(payload, alg, kid, expect)
        if type(resolved) is Verdict:
            return resolved
        key, tenant, iss = resolved  # type: ignore[misc]
        if key is not slot_key:
            return None
        if status & INVALID:
            return Verdict(False, Reason.BAD_SIGNATURE, tenant, iss, key.kid, foreign=key.foreign)
        code = NATIVE.check_claims(payload, now, self._leeway, audience) if scanned else -1
        if code < 0:
            reason = check_claims(payload, now=now, leeway=self._leeway, audience=audience)
        else:
            reason = CLAIM_REASONS[code]
        return self._conclude(reason, payload, payload_bytes, tenant, iss, key.kid, key.foreign)
