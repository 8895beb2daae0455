"""Signed checkpoints of the audit chain: tamper evidence that survives a
database superuser.

The hash chain in Postgres (migrations/0001_init.sql) exposes any edit of a
row unless the editor also rewrites every later hash, which whoever controls
the database can do. A checkpoint pins one row of the chain, ``(seq, hash)``,
under a signature by a dedicated HSM key, and is kept outside Postgres (a file
under the state directory and the log). Because each row's hash commits to
every row before it, a chain that still has ``hash`` at ``seq`` has the same
first ``seq`` rows as when the checkpoint was signed; one that was rewritten,
however consistently, has not.

Version 1, as signed::

    canonical = JSON of {"hash": hex, "kid": str, "seq": int, "time": int, "v": 1}
                with sorted keys, no whitespace, ASCII only
    signed    = SIGNING_CONTEXT || canonical          (RS256, PKCS#1 v1.5 SHA-256)

``kid`` is the RFC 7638 thumbprint of the checkpoint key; ``time`` is Unix
seconds when it was signed (a record, not checked). A checkpoint is stored as
one JSON line: the canonical members plus ``"sig"`` (unpadded base64url).
The context prefix keeps a checkpoint signature from ever being valid as
anything else (a JWS, say) should the key be reused by mistake.

Pure: formatting, parsing and verification only; reading the chain is the
caller's (``verify_checkpoints`` takes a lookup function).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from fedtoken.core.errors import PolicyViolation
from fedtoken.core.jose import is_valid_kid, loads_strict, verify_signature
from fedtoken.core.jwk import b64url_decode, b64url_encode, rsa_thumbprint
from fedtoken.core.keys import load_rsa_public_key

CHECKPOINT_VERSION: Final = 1
CHECKPOINT_ALG: Final = "RS256"
SIGNING_CONTEXT: Final = b"fedtoken audit checkpoint v1\n"
# Labels of the checkpoint key pair in the HSM: f"{CHECKPOINT_LABEL_PREFIX}{kid}".
# Not under the tenant keys' "fedtoken/" prefix, so no tenant operation can
# list, use or destroy it, and the checkpoint signer uses no other key.
CHECKPOINT_LABEL_PREFIX: Final = "fedtoken-audit/"

_MEMBERS: Final = frozenset({"v", "seq", "hash", "time", "kid", "sig"})
_HEX32: Final = re.compile(r"[0-9a-f]{64}")
MAX_LINE: Final = 4096  # an RSA-8192 signature is 1366 characters


class CheckpointFormatError(ValueError):
    """A checkpoint line that is not a well-formed version 1 checkpoint."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a checkpoint asserts: the chain's row ``seq`` has hash ``hash``."""

    seq: int
    hash: bytes
    time: int
    kid: str

    def __post_init__(self) -> None:
        if type(self.seq) is not int or self.seq < 1:
            raise CheckpointFormatError("seq must be an integer >= 1")
        if not isinstance(self.hash, bytes) or len(self.hash) != 32:
            raise CheckpointFormatError("hash must be 32 bytes (SHA-256)")
        if type(self.time) is not int or self.time < 0:
            raise CheckpointFormatError("time must be a non-negative integer")
        if not is_valid_kid(self.kid):
            raise CheckpointFormatError("kid is not a valid key id")

    def members(self) -> dict[str, Any]:
        return {"v": CHECKPOINT_VERSION, "seq": self.seq, "hash": self.hash.hex(),
                "time": self.time, "kid": self.kid}


def canonical(checkpoint: Checkpoint) -> bytes:
    """The canonical JSON of a checkpoint (sorted keys, no whitespace, ASCII)."""
    return _dumps(checkpoint.members()).encode("ascii")


def signing_input(checkpoint: Checkpoint) -> bytes:
    """The exact bytes the checkpoint key signs."""
    return SIGNING_CONTEXT + canonical(checkpoint)


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    sig: bytes

    def line(self) -> str:
        """The checkpoint as one JSON line (no newline)."""
        return _dumps({**self.checkpoint.members(), "sig": b64url_encode(self.sig)})


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def parse_line(line: str) -> SignedCheckpoint:
    """A checkpoint line, strictly: exactly the version 1 members with their
    types, lowercase hex, strict base64url. Raises CheckpointFormatError."""
    if len(line) > MAX_LINE:
        raise CheckpointFormatError("line too long")
    try:
        data = loads_strict(line.encode("utf-8"))
    except (ValueError, UnicodeError) as exc:
        raise CheckpointFormatError(f"not a JSON object ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointFormatError("not a JSON object")
    if set(data) != _MEMBERS:
        missing, extra = sorted(_MEMBERS - set(data)), sorted(set(data) - _MEMBERS)
        raise CheckpointFormatError(f"members differ (missing {missing}, unexpected {extra})")
    if type(data["v"]) is not int or data["v"] != CHECKPOINT_VERSION:
        raise CheckpointFormatError(f"unsupported version {data['v']!r}")
    digest, sig = data["hash"], data["sig"]
    if type(digest) is not str or not _HEX32.fullmatch(digest):
        raise CheckpointFormatError("hash must be 64 lowercase hex digits")
    if type(sig) is not str:
        raise CheckpointFormatError("sig must be a base64url string")
    try:
        signature = b64url_decode(sig)
    except ValueError as exc:
        raise CheckpointFormatError("sig is not unpadded base64url") from exc
    return SignedCheckpoint(
        Checkpoint(seq=data["seq"], hash=bytes.fromhex(digest), time=data["time"],
                   kid=data["kid"]),
        signature,
    )


def verify(signed: SignedCheckpoint, key: RSAPublicKey) -> bool:
    """Whether ``key`` signed this checkpoint and is the key its kid names."""
    numbers = key.public_numbers()
    if rsa_thumbprint(numbers.n, numbers.e) != signed.checkpoint.kid:
        return False
    return verify_signature(CHECKPOINT_ALG, key, signing_input(signed.checkpoint), signed.sig)


def pinned_keys(document: Any) -> dict[str, RSAPublicKey]:
    """The checkpoint keys an operator pinned: a public JWK, or a JWKS
    (``{"keys": [...]}``) to keep accepting the checkpoints of earlier keys.
    Each is indexed by its RFC 7638 thumbprint; a JWK whose ``kid`` is not
    its thumbprint is refused (PolicyViolation), as is an empty set."""
    jwks = document.get("keys") if isinstance(document, dict) and "keys" in document \
        else [document]
    if not isinstance(jwks, list) or not jwks:
        raise PolicyViolation("no key: give a public JWK or a non-empty JWKS", field="jwk")
    keys: dict[str, RSAPublicKey] = {}
    for jwk in jwks:
        key = load_rsa_public_key(jwk)
        numbers = key.public_numbers()
        kid = rsa_thumbprint(numbers.n, numbers.e)
        if jwk.get("kid", kid) != kid:
            raise PolicyViolation(
                f"the JWK's kid {jwk.get('kid')!r} is not its thumbprint {kid!r}", field="jwk")
        keys[kid] = key
    return keys


# --- checking a file of checkpoints against a chain ------------------------------


class CheckpointProblem(enum.Enum):
    NO_CHECKPOINTS = "NO_CHECKPOINTS"
    """The file holds no checkpoint: nothing is proven."""
    MALFORMED = "MALFORMED"
    """A line is not a version 1 checkpoint."""
    KEY_MISMATCH = "KEY_MISMATCH"
    """The checkpoint names a key (kid) other than the pinned one(s)."""
    BAD_SIGNATURE = "BAD_SIGNATURE"
    """The pinned key did not sign this checkpoint (the line was altered)."""
    ROW_MISSING = "ROW_MISSING"
    """The chain has no row at the checkpoint's seq (deleted or truncated)."""
    HASH_MISMATCH = "HASH_MISMATCH"
    """The row at seq has another hash: the chain up to it was rewritten."""
    CHAIN_BROKEN = "CHAIN_BROKEN"
    """Every checkpoint holds, but the chain itself does not verify."""
    ANCHOR_UNSIGNED = "ANCHOR_UNSIGNED"
    """Retention removed rows up to an anchor that no checkpoint in the file
    signs (moved by hand, or the file is not this chain's)."""


@dataclass(frozen=True, slots=True)
class CheckpointReport:
    ok: bool
    checked: int
    problem: CheckpointProblem | None = None
    line: int | None = None  # 1-based line of the first failing checkpoint
    seq: int | None = None  # its seq, when it could be read
    detail: str = ""
    archived: int = 0  # checkpoints before the retention anchor (signature checked only)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "archived": self.archived,
                "problem": self.problem.value if self.problem else None,
                "line": self.line, "first_bad_seq": self.seq, "detail": self.detail}


def verify_checkpoints(
    lines: Iterable[str],
    keys: Mapping[str, RSAPublicKey],
    row_hash: Callable[[int], bytes | None],
    *,
    chain_ok: bool,
    chain_detail: str = "",
    anchor: tuple[int, bytes] | None = None,
) -> CheckpointReport:
    """Check every checkpoint (in order; blank lines are skipped) and stop at
    the first that fails: its signature by the pinned key of its kid
    (``keys``: kid -> public key), then that ``row_hash(seq)`` (the chain's
    hash at seq, None when there is no such row) is the checkpoint's hash.
    When all hold, the report is the chain's own verdict (``chain_ok``).

    ``anchor``: the (seq, hash) where the retained chain starts after
    retention removed older rows. Checkpoints before it are only checked for
    their signature (their rows are in the archives: ``verify_archive``);
    one checkpoint must sign the anchor itself, or the report fails with
    ANCHOR_UNSIGNED, since an anchor is only as good as its signature."""
    checked = archived = 0
    anchor_signed = anchor is None
    lookup = row_hash
    if anchor is not None:
        anchor_seq, anchor_hash = anchor

        def lookup(seq: int) -> bytes | None:
            return anchor_hash if seq == anchor_seq else row_hash(seq)
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        problem, seq, detail = _check_one(text, keys, lookup,
                                          archived_before=anchor[0] if anchor else 0)
        if problem is not None:
            return CheckpointReport(False, checked, problem, number, seq, detail, archived)
        if anchor is not None and seq is not None and seq < anchor[0]:
            archived += 1
            continue
        if anchor is not None and seq == anchor[0]:
            anchor_signed = True
        checked += 1
    if not checked and not archived:
        return CheckpointReport(False, 0, CheckpointProblem.NO_CHECKPOINTS,
                                detail="no checkpoint to check")
    if not anchor_signed:
        assert anchor is not None
        return CheckpointReport(
            False, checked, CheckpointProblem.ANCHOR_UNSIGNED, seq=anchor[0],
            detail=f"the retained chain starts after row {anchor[0]} (hash "
                   f"{anchor[1].hex()}), and no checkpoint in the file signs that row",
            archived=archived)
    if not chain_ok:
        return CheckpointReport(False, checked, CheckpointProblem.CHAIN_BROKEN,
                                detail=chain_detail or "the audit chain does not verify",
                                archived=archived)
    return CheckpointReport(True, checked, archived=archived)


def _check_one(
    text: str, keys: Mapping[str, RSAPublicKey], row_hash: Callable[[int], bytes | None],
    *, archived_before: int = 0,
) -> tuple[CheckpointProblem | None, int | None, str]:
    try:
        signed = parse_line(text)
    except CheckpointFormatError as exc:
        return CheckpointProblem.MALFORMED, None, str(exc)
    cp = signed.checkpoint
    key = keys.get(cp.kid)
    if key is None:
        return (CheckpointProblem.KEY_MISMATCH, cp.seq,
                f"signed by kid {cp.kid!r}; pinned: {sorted(keys)}")
    if not verify(signed, key):
        return (CheckpointProblem.BAD_SIGNATURE, cp.seq,
                "the signature does not verify with the pinned key")
    if cp.seq < archived_before:
        return None, cp.seq, ""  # its row was archived by retention
    found = row_hash(cp.seq)
    if found is None:
        return CheckpointProblem.ROW_MISSING, cp.seq, f"the chain has no row {cp.seq}"
    if found != cp.hash:
        return (CheckpointProblem.HASH_MISMATCH, cp.seq,
                f"row {cp.seq} has hash {found.hex()} where the checkpoint signed "
                f"{cp.hash.hex()}: the chain up to it was rewritten")
    return None, cp.seq, ""
