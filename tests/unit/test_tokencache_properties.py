"""Hypothesis mutations of a cached genuine token, through the Python path
and the native path with a warm cache: each verdict equals the verdict of an
engine without the cache (and a mutation never verifies)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtoken.core.model import Reason
from fedtoken.verifier.native import NATIVE_AVAILABLE
from tests.unit._world import World, b64url_encode, make_world

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
PATHS = [False] + ([None] if NATIVE_AVAILABLE else [])


@pytest.fixture(scope="module", params=PATHS, ids=lambda n: "python" if n is False else "native")
def pair(request: pytest.FixtureRequest) -> tuple[World, World, str]:
    cached = make_world(native=request.param, token_cache=256)
    plain = make_world(native=request.param, token_cache=0)
    genuine = cached.token()
    for _ in range(2):
        assert cached.verify(genuine).valid and plain.verify(genuine).valid
    return cached, plain, genuine


def _same(cached: World, plain: World, token: str) -> None:
    a, b = cached.verify(token), plain.verify(token)
    assert a == b
    assert cached.verify(token) == b  # again: may now come from the cache


@SETTINGS
@given(data=st.data())
def test_mutations_same_verdict_with_and_without_cache(
    pair: tuple[World, World, str], data: st.DataObject
) -> None:
    cached, plain, genuine = pair
    raw = bytearray(genuine.encode())
    kind = data.draw(st.sampled_from(["flip", "insert", "delete"]))
    index = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[index] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "insert":
        raw.insert(index, data.draw(st.integers(0, 127)))
    else:
        del raw[index]
    token = raw.decode("latin-1")
    _same(cached, plain, token)
    if token != genuine:
        assert cached.verify(token).reason is not Reason.OK


@SETTINGS
@given(sig=st.binary(max_size=300), header=st.binary(max_size=40))
def test_garbage_same_verdict(pair: tuple[World, World, str], sig: bytes, header: bytes) -> None:
    cached, plain, genuine = pair
    h, p, _ = genuine.split(".")
    _same(cached, plain, f"{h}.{p}.{b64url_encode(sig)}")
    _same(cached, plain, f"{b64url_encode(header)}.{p}.{genuine.split('.')[2]}")
