"""Building blocks of the request fuzz targets (tests/unit/test_fuzz_requests.py).

- ``FakeServicerContext``: the three things ``fedtoken.rpc.interceptors``
  uses of a ``grpc.aio.ServicerContext``; ``abort`` checks its arguments the
  way grpc does, records them and raises ``grpc.aio.AbortError`` (as grpc's
  own context does), so the boundary's handling of it is the real one.
- ``unary_handlers``: every unary method of a generated ``add_*_to_server``
  function, wrapped by the real ``Boundary`` interceptor (``_safe`` around
  the request deserializer, ``wrap_unary`` around the servicer method).
- protobuf wire-format writers and ``mutated``: damaged encodings of a valid
  message (bit flips, truncation, garbage, wrong wire types, invalid UTF-8 in
  a string field, absurd lengths, unterminated or deep groups, unknown and
  repeated fields).
- strategies for hostile field values: text with NUL, C0/C1 controls, bidi
  overrides, zero-width and non-characters (lone surrogates cannot travel in
  a protobuf string), strings up to 70 KB built by repetition (cheap to
  draw), int32/int64 extremes, lists around and far past the limits.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from fedtoken.rpc.interceptors import Boundary

# The identity every fuzzed call authenticates as: a bootstrap operator of the
# fake world, so calls reach the use cases instead of stopping at PERMISSION_DENIED.
FUZZ_IDENTITY = "spiffe://fuzz.example/admin"

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# 9999-12-31T23:59:59Z, the largest timestamp fedtoken accepts.
MAX_TIMESTAMP = 253_402_300_799
HUGE_LENGTHS = (63, 64, 65, 127, 128, 129, 200, 255, 256, 257, 512, 513, 1024, 1025,
                8191, 8192, 8193, 16384, 16385, 65535, 65536, 70_000)


# --- the grpc side ----------------------------------------------------------------

_METADATA_KEY = re.compile(r"[0-9a-z_.-]+\Z")


@dataclass
class FakeServicerContext:
    """A ``grpc.aio.ServicerContext`` as far as the boundary uses one."""

    metadata: tuple[tuple[str, str | bytes], ...] = ()
    peer_address: str = "ipv4:10.0.0.7:50000"
    code: grpc.StatusCode | None = None
    details: str = ""
    trailing: tuple[tuple[str, str | bytes], ...] = ()
    aborts: int = 0

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None  # no deadline, like a caller that set none

    def peer(self) -> str:
        return self.peer_address

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Iterable[tuple[str, str | bytes]] = ()) -> None:
        await asyncio.sleep(0)
        self.aborts += 1
        if self.aborts > 1:
            raise grpc.aio.UsageError("Abort already called!")
        assert isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK, code
        assert isinstance(details, str), type(details)
        details.encode("utf-8")  # grpc sends it as UTF-8: a lone surrogate would fail here
        trailing = tuple(trailing_metadata)
        for item in trailing:
            # grpc's raise_if_not_valid_trailing_metadata, plus the header rules
            # of grpc core (lowercase keys; bytes only under "-bin" keys; other
            # values printable ASCII).
            assert isinstance(item, tuple) and len(item) == 2, item
            key, value = item
            assert isinstance(key, str) and _METADATA_KEY.match(key), key
            if key.endswith("-bin"):
                assert isinstance(value, bytes), (key, type(value))
            else:
                assert isinstance(value, str), (key, type(value))
                assert all(0x20 <= ord(c) <= 0x7E for c in value), (key, value)
        self.code, self.details, self.trailing = code, details, trailing
        raise grpc.aio.AbortError("Locally aborted.")


@dataclass(frozen=True)
class _CallDetails:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Collector:
    """Stands in for a grpc server in a generated ``add_*_to_server``."""

    def __init__(self) -> None:
        self.generic: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        pass


async def unary_handlers(add_to_server: Callable[[Any, Any], None], servicer: object,
                         service: str, methods: Sequence[str]) -> dict[str, Any]:
    """method name -> the handler grpc would run, as wrapped by ``Boundary``."""
    collector = _Collector()
    add_to_server(servicer, collector)
    boundary = Boundary(authenticate=lambda _context: FUZZ_IDENTITY)
    out: dict[str, Any] = {}
    for name in methods:
        details = _CallDetails(f"/{service}/{name}")

        async def continuation(d: Any) -> Any:
            for generic in collector.generic:
                handler = generic.service(d)
                if handler is not None:
                    return handler
            return None

        out[name] = await boundary.intercept_service(continuation, details)
        assert out[name] is not None and out[name].unary_unary is not None, name
    return out


# --- protobuf wire format -----------------------------------------------------------

VARINT, FIXED64, LEN, SGROUP, EGROUP, FIXED32 = 0, 1, 2, 3, 4, 5
_WIRE = {
    FieldDescriptor.TYPE_STRING: LEN, FieldDescriptor.TYPE_BYTES: LEN,
    FieldDescriptor.TYPE_MESSAGE: LEN, FieldDescriptor.TYPE_BOOL: VARINT,
    FieldDescriptor.TYPE_INT32: VARINT, FieldDescriptor.TYPE_INT64: VARINT,
    FieldDescriptor.TYPE_ENUM: VARINT,
}
# Invalid UTF-8: a stray continuation byte, a truncated sequence, an overlong
# NUL, an encoded surrogate, a code point past U+10FFFF, 0xFF.
BAD_UTF8 = (b"\x80", b"abc\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff",
            b"ok\xe2\x82", b"\xf8\x88\x80\x80\x80")


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers as protobuf writes them: ten bytes
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, LEN) + varint(len(payload)) + payload


def string_paths(descriptor: Any, depth: int = 2) -> list[tuple[int, ...]]:
    """Field-number paths to every string field, through message fields."""
    paths: list[tuple[int, ...]] = []
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            paths.append((f.number,))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth > 0:
            paths.extend((f.number, *p) for p in string_paths(f.message_type, depth - 1))
    return paths


def _nest(path: tuple[int, ...], payload: bytes) -> bytes:
    for number in reversed(path):
        payload = length_delimited(number, payload)
    return payload


def _wrong_wire(f: Any, number: int, draw: st.DrawFn) -> bytes:
    right = _WIRE.get(f.type, LEN) if f is not None else -1
    wire = draw(st.sampled_from([w for w in range(8) if w != right]))
    body = b"\x00"  # wire types 6 and 7 do not exist
    if wire == VARINT:
        body = varint(draw(st.integers(INT64_MIN, INT64_MAX)))
    elif wire == FIXED64:
        body = draw(st.binary(min_size=8, max_size=8))
    elif wire == LEN:
        body = varint(3) + b"\x08\x96\x01"
    elif wire == SGROUP:
        body = tag(number, EGROUP) if draw(st.booleans()) else b""
    elif wire == EGROUP:
        body = b""
    elif wire == FIXED32:
        body = draw(st.binary(min_size=4, max_size=4))
    return tag(number, wire) + body


@st.composite
def mutated(draw: st.DrawFn, seeds: st.SearchStrategy[Message]) -> bytes:
    """The encoding of a drawn message, damaged one to four times."""
    message = draw(seeds)
    descriptor: Any = message.DESCRIPTOR
    data = bytearray(message.SerializeToString())
    fields = list(descriptor.fields)
    numbers = [f.number for f in fields] or [1]
    strings = string_paths(descriptor)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from([
            "flip", "truncate", "append", "insert", "bad_utf8", "wrong_wire", "huge_length",
            "overlong_varint", "groups", "unknown_field", "field_zero", "repeat",
        ]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=24))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "bad_utf8" and strings:
            path = draw(st.sampled_from(strings))
            bad = draw(st.sampled_from(BAD_UTF8))
            data += _nest(path, draw(st.text(max_size=4)).encode() + bad)
        elif op == "wrong_wire":
            number = draw(st.sampled_from(numbers))
            f = next((f for f in fields if f.number == number), None)
            data += _wrong_wire(f, number, draw)
        elif op == "huge_length":
            number = draw(st.sampled_from(numbers))
            data += tag(number, LEN) + varint(draw(st.sampled_from(
                [2**31 - 1, 2**31, 2**32 + 1, 2**63, -1, len(data) + 1])))
        elif op == "overlong_varint":
            data += tag(draw(st.sampled_from(numbers)), VARINT) + b"\xff" * draw(
                st.integers(10, 12)) + b"\x01"
        elif op == "groups":
            depth = draw(st.sampled_from([1, 2, 100, 101, 200]))
            number = draw(st.integers(1, 20))
            opened = tag(number, SGROUP) * depth
            data += opened + (tag(number, EGROUP) * depth if draw(st.booleans()) else b"")
        elif op == "unknown_field":
            number = draw(st.sampled_from([15, 16, 99, 1000, 2**29 - 1]))
            data += length_delimited(number, draw(st.binary(max_size=16)))
        elif op == "field_zero":
            data += tag(0, draw(st.sampled_from([VARINT, LEN]))) + b"\x00"
        elif op == "repeat" and fields:
            # A field (or another member of a oneof) given again: the last wins.
            other = message.__class__()
            other.CopyFrom(draw(seeds))
            data += other.SerializeToString()
    return bytes(data)


def request_bytes(seeds: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(seeds), st.binary(max_size=512))


# --- hostile values -----------------------------------------------------------------

HOSTILE_CHARS = (
    "\x00\x01\x07\x08\t\n\x0b\x0c\r\x1b\x1f\x7f\x80\x85\x9b\x9f\xa0\xad"
    "\u0338\u034f\u061c\u115f\u180e\u200b\u200c\u200d\u200e\u200f\u2028\u2029"
    "\u202a\u202b\u202c\u202d\u202e\u2060\u2066\u2067\u2068\u2069\u206f\u3000"
    "\ufdd0\ufeff\ufff9\ufffb\ufffc\ufffd\ufffe\uffff"
    "\U0001f600\U0001f3f4\U000e0001\U000e007f\U000f0000\U0010ffff"
    "/\\@%?#:;.,\"'`<>{}[]$*&|= -_~+AZaz09\u0130\u0131\u212a\u017f\uff41"
)
# codec="utf-8": anything but lone surrogates, which protobuf strings cannot hold.
hostile_char = st.sampled_from(HOSTILE_CHARS) | st.characters(codec="utf-8")


def hostile_text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(alphabet=hostile_char, max_size=max_size)


def _repeat(unit: str, n: int) -> str:
    return (unit * (n // len(unit) + 1))[:n]


huge_text: st.SearchStrategy[str] = st.builds(
    _repeat, st.text(alphabet=hostile_char, min_size=1, max_size=6),
    st.sampled_from(HUGE_LENGTHS))


def mostly(known: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any],
           known_in_ten: int = 7) -> st.SearchStrategy[Any]:
    """``known`` in about ``known_in_ten`` draws out of ten, else ``hostile``:
    requests then get past their first check often enough to reach the deeper
    ones, with one or two hostile fields at a time."""
    return st.integers(0, 9).flatmap(lambda i: known if i < known_in_ten else hostile)


def text_field(meaningful: Sequence[str] = ("",)) -> st.SearchStrategy[str]:
    """A string field: mostly a meaningful value; else hostile text, a huge
    string, or a meaningful value with hostile text around it or repeated."""
    known = st.sampled_from(list(meaningful) or [""])
    return mostly(known, st.one_of(
        hostile_text(),
        huge_text,
        st.builds(lambda a, b: a + b, known, hostile_text(4) | st.sampled_from(["\n", "\x00"])),
        st.builds(lambda a, b: a + b, hostile_text(4), known),
        st.builds(lambda a, n: a * n, known, st.sampled_from([2, 64, 2000])),
    ))


def int64_field(*usual: int) -> st.SearchStrategy[int]:
    edges = [0, 1, -1, 2, 59, 60, 61, 3600, 3601, 7 * 86400, 7 * 86400 + 1, 2**31 - 1, 2**31,
             2**32, 2**53 + 1, INT64_MAX, INT64_MIN, INT64_MAX - 1, INT64_MIN + 1,
             MAX_TIMESTAMP, MAX_TIMESTAMP + 1, -MAX_TIMESTAMP]
    return mostly(st.sampled_from([0, *usual]),
                  st.sampled_from(edges) | st.integers(INT64_MIN, INT64_MAX), 5)


def int32_field(*usual: int) -> st.SearchStrategy[int]:
    edges = [0, 1, -1, 8, 999, 1000, 1001, 1024, 2047, 2048, 2049, 2056, 4096, 8192, 8193,
             8200, 10_000, INT32_MAX, INT32_MIN]
    return mostly(st.sampled_from([0, *usual]),
                  st.sampled_from(edges) | st.integers(INT32_MIN, INT32_MAX), 5)


def string_list(item: st.SearchStrategy[str], *limits: int) -> st.SearchStrategy[list[str]]:
    """Lists around each limit and far past it (repetition: cheap to draw)."""
    sizes = sorted({0, 1, *limits, *(n + 1 for n in limits), *(max(n - 1, 0) for n in limits),
                    1000})
    return st.one_of(
        st.lists(item, min_size=1, max_size=3),
        st.lists(item, max_size=8),
        st.builds(lambda x, n: [x] * n, item, st.sampled_from(sizes)),
        st.builds(lambda xs, n: (xs * n)[:n], st.lists(item, min_size=1, max_size=4),
                  st.sampled_from(sizes)),
    )


_INTS = {
    FieldDescriptor.TYPE_INT32: (INT32_MIN, INT32_MAX), FieldDescriptor.TYPE_SINT32:
    (INT32_MIN, INT32_MAX), FieldDescriptor.TYPE_SFIXED32: (INT32_MIN, INT32_MAX),
    FieldDescriptor.TYPE_INT64: (INT64_MIN, INT64_MAX), FieldDescriptor.TYPE_SINT64:
    (INT64_MIN, INT64_MAX), FieldDescriptor.TYPE_SFIXED64: (INT64_MIN, INT64_MAX),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _value(f: Any, depth: int) -> st.SearchStrategy[Any] | None:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return message_of(GetMessageClass(f.message_type), depth - 1) if depth > 0 else None
    if f.type == FieldDescriptor.TYPE_STRING:
        return text_field()
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_ENUM:  # open enums: unknown numbers too
        known = [v.number for v in f.enum_type.values]
        return st.sampled_from(known) | st.integers(INT32_MIN, INT32_MAX)
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if f.type == FieldDescriptor.TYPE_FLOAT else 64)
    lo, hi = _INTS[f.type]
    return st.sampled_from([lo, hi, 0, 1, -1 if lo else 2]) | st.integers(lo, hi)


def message_of(cls: type[Message], depth: int = 2) -> st.SearchStrategy[Message]:
    """Any message of ``cls``, field by field from its descriptor (for RPCs
    that have no strategy of their own yet). Oneof members set together
    leave the last one set, as on the wire."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for f in cls.DESCRIPTOR.fields:
        value = _value(f, depth)
        is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
        if value is None or is_map:
            continue
        if f.type == FieldDescriptor.TYPE_STRING and f.is_repeated:
            value = string_list(value, 16)
        elif f.is_repeated:
            value = st.lists(value, max_size=4)
        optional[f.name] = value
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: cls(**kw))


def message_strings(message: Message) -> list[str]:
    """Every string value in a message, through nested messages."""
    out: list[str] = []
    for f, value in message.ListFields():
        values = value if f.is_repeated else [value]
        for v in values:
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, Message):
                out.extend(message_strings(v))
    return out


def echoed(haystack: str, inputs: Iterable[str], window: int) -> str | None:
    """A ``window``-character piece of an input that appears in ``haystack``."""
    if len(haystack) < window:
        return None
    pieces = {haystack[i:i + window] for i in range(len(haystack) - window + 1)}
    for s in inputs:
        if len(s) < window:
            continue
        for i in range(len(s) - window + 1):
            piece = s[i:i + window]
            if piece in pieces:
                return piece
    return None
