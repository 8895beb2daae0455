"""Properties over generated inputs: a genuine token survives no tampering,
and no input makes the parser (or the engine) raise anything unplanned."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtoken.core import jose
from fedtoken.core.claims import check_claims
from fedtoken.core.errors import TokenError
from fedtoken.core.jwk import b64url_decode, b64url_encode
from fedtoken.core.model import Reason
from tests.unit._world import NOW, World, make_world

SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def genuine(world: World) -> str:
    token = world.token()
    assert world.verify(token).valid
    return token


def assert_refused(world: World, token: str) -> None:
    verdict = world.verify(token)
    assert not verdict.valid and verdict.reason is not Reason.OK


@SETTINGS
@given(data=st.data())
def test_single_bit_flip_never_verifies(world: World, genuine: str, data: st.DataObject) -> None:
    raw = bytearray(genuine.encode())
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= 1 << data.draw(st.integers(0, 7))
    assert_refused(world, raw.decode("latin-1"))


def test_every_bit_flip_in_the_header_and_signature_tail(world: World, genuine: str) -> None:
    # Exhaustive where tampering is subtlest: the header, and the last
    # characters of each segment (trailing bits).
    dots = [i for i, c in enumerate(genuine) if c == "."]
    positions = set(range(dots[0] + 1))
    for end in (dots[0], dots[1], len(genuine)):
        positions.update(range(max(0, end - 3), end))
    for index, bit in itertools.product(sorted(positions), range(8)):
        raw = bytearray(genuine.encode())
        raw[index] ^= 1 << bit
        assert_refused(world, raw.decode("latin-1"))


@SETTINGS
@given(data=st.data())
def test_character_insert_never_verifies(world: World, genuine: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(genuine)))
    char = data.draw(st.characters() | st.sampled_from("AQgw-_.=+/ "))
    assert_refused(world, genuine[:index] + char + genuine[index:])


@SETTINGS
@given(data=st.data())
def test_character_delete_never_verifies(world: World, genuine: str, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(genuine) - 1))
    assert_refused(world, genuine[:index] + genuine[index + 1 :])


def test_segment_permutations_never_verify(world: World, genuine: str) -> None:
    parts = genuine.split(".")
    for order in itertools.permutations(range(3)):
        if order != (0, 1, 2):
            assert_refused(world, ".".join(parts[i] for i in order))
    for i, j in itertools.product(range(3), repeat=2):
        if i != j:
            copy = list(parts)
            copy[i] = parts[j]
            assert_refused(world, ".".join(copy))


@SETTINGS
@given(text=st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_\-=+/ .]{0,120}", fullmatch=True))
def test_parse_text_raises_only_token_error(text: str) -> None:
    try:
        jose.parse_compact(text)
    except TokenError as exc:
        assert exc.verdict_reason is Reason.MALFORMED


@SETTINGS
@given(data=st.binary(max_size=300))
def test_parse_bytes_raises_only_token_error(data: bytes) -> None:
    try:
        jose.parse_compact(data)
    except TokenError as exc:
        assert exc.verdict_reason is Reason.MALFORMED


@SETTINGS
@given(header=st.binary(max_size=80), payload=st.binary(max_size=80), sig=st.binary(max_size=8))
def test_parse_well_encoded_garbage(header: bytes, payload: bytes, sig: bytes) -> None:
    token = ".".join(b64url_encode(p) for p in (header, payload, sig))
    try:
        parsed = jose.parse_compact(token)
    except TokenError as exc:
        assert exc.verdict_reason is Reason.MALFORMED
    else:
        assert isinstance(parsed.header, dict) and isinstance(parsed.payload, dict)


@SETTINGS
@given(header=json_values, payload=json_values)
def test_engine_never_raises_on_generated_json(world: World, header: Any, payload: Any) -> None:
    token = (
        ".".join(b64url_encode(json.dumps(v).encode()) for v in (header, payload))
        + "."
        + b64url_encode(b"\x00" * 256)
    )
    assert not world.verify(token).valid


@SETTINGS
@given(
    payload=st.dictionaries(
        st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "x"]), json_values
    )
)
def test_check_claims_total(payload: dict[str, Any]) -> None:
    result = check_claims(payload, now=NOW, leeway=30, audience="a")
    assert result is None or isinstance(result, Reason)


def _reference_b64url_decode(raw: bytes) -> bytes:
    """The obvious (slow) reading of the contract: only the url-safe
    alphabet, no padding, and the encoding of the result must be the input."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if len(raw) % 4 == 1 or any(c not in alphabet for c in raw):
        raise ValueError("not unpadded base64url")
    out = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    if base64.urlsafe_b64encode(out).rstrip(b"=") != raw:
        raise ValueError("non-canonical base64url")
    return out


@SETTINGS
@given(text=st.binary(max_size=24) | st.from_regex(r"[A-Za-z0-9_\-+/=]{0,12}", fullmatch=True))
def test_b64url_decoder_agrees_with_reference(text: bytes | str) -> None:
    raw = text.encode() if isinstance(text, str) else text
    try:
        expected: bytes | None = _reference_b64url_decode(raw)
    except ValueError:
        expected = None
    for decode in (b64url_decode, jose.b64url_decode_strict):
        try:
            actual: bytes | None = decode(raw)
        except ValueError:
            actual = None
        assert actual == expected
    if isinstance(text, str):  # the str form of the same input decodes alike
        assert (b64url_decode(text) if expected is not None else None) == expected
