"""Log configuration: human text on a terminal, one JSON object per line
otherwise (or as ``log_format`` says).

API: ``configure(log_format: str = "auto", level: int = logging.INFO,
worker: str = "")`` installs the root handler (serve, each worker, the CLI).
Request-scoped fields (request id, method, principal, tenant, outcome, code,
duration_ms) are passed as ``extra={...}`` by the RPC boundary's access log
(``fedtoken.rpc.interceptors``, logger ``fedtoken.rpc.access``).

JSON lines (``log_format="json"``): ``ts`` (RFC 3339, UTC, milliseconds),
``level``, ``logger``, ``message``, ``worker`` (when given), ``pid``, then
the request-scoped fields a record carries and any other ``extra`` field,
and ``exception`` (the formatted traceback as one escaped string) when the
record has one. Text (``"text"``): the format serve and the CLI always had,
``%(asctime)s %(levelname)s %(name)s[w0:%(process)d]: %(message)s``.

Never log a token, a PIN or key material. The formatters redact them anyway,
as defence in depth (``redact``, ``redact_value``): a compact JWS (three
base64url segments, the first decoding to a JSON object with "alg"; one
that starts with "{", as every JOSE library writes it), the
value of a secret-named key (pin, password, secret, token, ...) in ``key=value``
text and in extras, and PEM private key blocks.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import json
import logging
import re
import sys
from typing import Any, Final

__all__ = [
    "REQUEST_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "redact",
    "redact_value",
]

# The request-scoped fields, in the order a JSON line gives them.
REQUEST_FIELDS: Final = ("request_id", "method", "principal", "tenant", "outcome", "code",
                         "duration_ms")

REDACTED: Final = "[redacted]"
REDACTED_JWS: Final = "[redacted-jws]"
REDACTED_PEM: Final = "[redacted-private-key]"

# -- redaction ----------------------------------------------------------------

# Candidate compact serialisations: three base64url runs joined by dots, not
# inside a longer base64url run (the signature may be empty: alg "none").
_JWS = re.compile(r"(?<![A-Za-z0-9_-])([A-Za-z0-9_-]{4,})\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)"
                  r"(?![A-Za-z0-9_-])")
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY"
                  r"-----|.*\Z)", re.DOTALL)
# ``pin=1234``, ``"password": "x"``, ``hsm_pin: 1234``, ``token=eyJ...``:
# searched in the lower-cased text (a case-insensitive alternation is several
# times slower in ``re``), the value replaced at the same position.
_SECRET_NAMES: Final = r"(?:pin|passw(?:or)?d|passphrase|secret|token)"  # noqa: S105 - names
_VALUE: Final = r"([\"']?\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;]+)"
# The name must start a word ("hsm_pin", "access_token" count; "fedtoken: 2",
# "spin: 3" do not).
_NAME_START: Final = r"(?<![a-z0-9])"
_KEY_VALUE = re.compile(_NAME_START + _SECRET_NAMES + _VALUE)
_KEY_VALUE_ANY_CASE = re.compile(r"(?<![A-Za-z0-9])" + _SECRET_NAMES + _VALUE, re.IGNORECASE)
# Parts of an extra's key that make its whole value a secret.
_SECRET_PARTS: Final = frozenset({"pin", "password", "passwd", "passphrase", "secret", "token",
                                  "authorization", "pem"})
_KEY_SPLIT = re.compile(r"[^a-z0-9]+")
_MAX_HEADER = 4096
# A cheap test first (``redact`` runs on every message and extra): a header
# that is a JSON object starting with "{" is base64url starting "ey" or "ew".
_JWS_HINT = re.compile(r"e[wy][A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]+\.")


def _is_jws_header(segment: str) -> bool:
    if len(segment) > _MAX_HEADER:
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):  # not base64url, not UTF-8, not JSON
        return False
    return isinstance(header, dict) and "alg" in header


_HEADER_START = re.compile(r"e[wy]")


def _jws(match: re.Match[str]) -> str:
    head = match.group(1)
    # The run before the first dot may carry a prefix glued to the header
    # ("Bearer_eyJ..."): a header starting further in counts too.
    if _is_jws_header(head) or any(_is_jws_header(head[m.start():])
                                   for m in _HEADER_START.finditer(head, 1)):
        return REDACTED_JWS
    return match.group(0)


def _redact_key_values(text: str) -> str:
    low = text.lower()
    # lower() keeps ASCII lengths; a rare character whose lower case is
    # longer would shift the positions: search the text itself then.
    found = (_KEY_VALUE.finditer(low) if len(low) == len(text)
             else _KEY_VALUE_ANY_CASE.finditer(text))
    spans = [m.span(2) for m in found]
    if not spans:
        return text
    out: list[str] = []
    last = 0
    for start, end in spans:
        out += (text[last:start], REDACTED)
        last = end
    out.append(text[last:])
    return "".join(out)


def redact(text: str) -> str:
    """``text`` with compact JWS, PEM private keys and the values of
    secret-named ``key=value`` pairs replaced."""
    if "." not in text and "=" not in text and ":" not in text and "-----" not in text:
        return text  # none of the three can be in it (most ids, names, codes)
    if "-----BEGIN" in text:
        text = _PEM.sub(REDACTED_PEM, text)
    if _JWS_HINT.search(text):
        text = _JWS.sub(_jws, text)
    return _redact_key_values(text)


@functools.lru_cache(maxsize=1024)  # extras use a few names, over and over
def secret_key(key: str) -> bool:
    """Whether an extra named ``key`` holds a secret (its value is dropped)."""
    parts = set(_KEY_SPLIT.split(key.lower()))
    return bool(parts & _SECRET_PARTS) or {"private", "key"} <= parts


def redact_value(key: str, value: Any) -> Any:
    """An extra's value as it may be logged: JSON scalars as they are
    (strings redacted), anything else as its redacted ``str``."""
    if secret_key(key):
        return REDACTED
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(value if isinstance(value, str) else str(value))


# -- formatters ---------------------------------------------------------------

# What every LogRecord has; anything else on a record came from ``extra``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring)."""

    def __init__(self, worker: str = "") -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
                  .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if self._worker:
            out["worker"] = self._worker
        out["pid"] = record.process
        fields = record.__dict__
        for key in REQUEST_FIELDS:
            if key in fields:
                out[key] = redact_value(key, fields[key])
        for key, value in fields.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = redact_value(key, value)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The human format (with the worker tag), redacted."""

    def __init__(self, worker: str = "") -> None:
        tag = f"{worker}:" if worker else ""
        super().__init__(f"%(asctime)s %(levelname)s %(name)s[{tag}%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours on the root logger (so ``configure`` can replace it)."""


def _replaced(handler: logging.Handler) -> bool:
    """Ours, or what ``logging.basicConfig`` puts on a standard stream (a
    caller that configured logging before us would otherwise print every
    line twice, once in the old format)."""
    return isinstance(handler, _Handler) or (
        type(handler) is logging.StreamHandler
        and handler.stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))


def configure(log_format: str = "auto", level: int = logging.INFO,
              worker: str = "") -> None:
    """Install the root handler on stderr: ``"json"``, ``"text"``, or
    ``"auto"`` (text when stderr is a terminal, JSON otherwise), at
    ``level``. Calling it again replaces the handler it installed, and a
    ``basicConfig`` stream handler on stderr or stdout goes too (other
    handlers on the root logger are left alone)."""
    if log_format not in ("auto", "text", "json"):
        raise ValueError(f"log_format must be auto, text or json, not {log_format!r}")
    stream = sys.stderr
    if log_format == "auto":
        try:
            log_format = "text" if stream.isatty() else "json"
        except (AttributeError, ValueError):  # a closed or odd stream
            log_format = "json"
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter(worker) if log_format == "json"
                         else TextFormatter(worker))
    root = logging.getLogger()
    for old in [h for h in root.handlers if _replaced(h)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
