"""Claim validation and construction."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedtoken.core.claims import (
    MAX_NUMERIC_DATE,
    RESERVED_CLAIMS,
    build_claims,
    check_claims,
    validate_extra_claims,
)
from fedtoken.core.errors import ErrorReason, InvalidRequest
from fedtoken.core.model import Reason

NOW = 1_800_000_000
AUD = "api://orders"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": "https://i.example",
        "sub": "alice",
        "aud": AUD,
        "exp": NOW + 60,
        "nbf": NOW,
        "iat": NOW,
        "jti": "j1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def check(payload: dict[str, Any], audience: str | None = AUD, leeway: int = 30) -> Reason | None:
    return check_claims(payload, now=NOW, leeway=leeway, audience=audience)


def test_good_claims() -> None:
    assert check(claims()) is None
    assert check(claims(aud=["x", AUD])) is None
    assert check(claims(nbf=None)) is None  # nbf is optional
    assert check(claims(exp=MAX_NUMERIC_DATE)) is None


@pytest.mark.parametrize("name", ["iss", "sub", "exp", "iat", "jti"])
def test_missing_required(name: str) -> None:
    assert check(claims(**{name: None})) is Reason.MISSING_CLAIM


def test_required_is_configurable() -> None:
    payload = claims(jti=None, iat=None)
    assert check_claims(payload, now=NOW, leeway=0, audience=AUD, required=("exp",)) is None


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    [
        "1800000100",
        "1.8e9",
        float(NOW + 60),
        1.8e9,
        True,
        False,
        None,
        -1,
        MAX_NUMERIC_DATE + 1,
        10**30,
        [NOW],
        {"t": NOW},
    ],
)
def test_time_claims_must_be_bounded_integers(name: str, value: object) -> None:
    payload = claims()
    payload[name] = value  # explicit, so None is JSON null here
    assert check(payload) is Reason.INVALID_CLAIM


@pytest.mark.parametrize("name", ["iss", "sub", "jti"])
@pytest.mark.parametrize("value", ["", 1, None, ["a"], {"a": 1}, True])
def test_string_claims(name: str, value: object) -> None:
    payload = claims()
    payload[name] = value
    assert check(payload) is Reason.INVALID_CLAIM


@pytest.mark.parametrize("aud", [None, "", [], [""], [AUD, 1], [AUD, None], 1, {"a": AUD}, True])
def test_aud_shape(aud: object) -> None:
    payload = claims()
    payload["aud"] = aud
    assert check(payload) is Reason.INVALID_CLAIM


def test_time_boundaries_with_leeway() -> None:
    # exp <= now - leeway is expired; one second later is not.
    assert check(claims(exp=NOW - 30)) is Reason.EXPIRED
    assert check(claims(exp=NOW - 29)) is None
    assert check(claims(exp=NOW), leeway=0) is Reason.EXPIRED
    assert check(claims(nbf=NOW + 31)) is Reason.NOT_YET_VALID
    assert check(claims(nbf=NOW + 30)) is None
    assert check(claims(iat=NOW + 31, nbf=None)) is Reason.ISSUED_IN_FUTURE
    assert check(claims(iat=NOW + 30, nbf=None)) is None


def test_fractional_now() -> None:
    payload = claims(exp=NOW, nbf=None, iat=NOW - 10)
    assert check_claims(payload, now=NOW - 0.5, leeway=0, audience=AUD) is None
    assert check_claims(payload, now=NOW + 0.5, leeway=0, audience=AUD) is Reason.EXPIRED


def test_audience() -> None:
    assert check(claims(aud="api://other")) is Reason.AUDIENCE_MISMATCH
    assert check(claims(aud=["api://a", "api://b"])) is Reason.AUDIENCE_MISMATCH
    assert check(claims(aud=None)) is Reason.AUDIENCE_MISMATCH
    assert check(claims(aud=AUD + "/")) is Reason.AUDIENCE_MISMATCH
    assert check(claims(aud=AUD.upper())) is Reason.AUDIENCE_MISMATCH
    # No audience expected: only tokens without aud qualify.
    assert check(claims(aud=None), audience="") is None
    assert check(claims(), audience="") is Reason.AUDIENCE_MISMATCH
    # Introspection: the comparison is skipped, the shape still checked.
    assert check(claims(aud="api://other"), audience=None) is None
    assert check(claims(aud=[]), audience=None) is Reason.INVALID_CLAIM


def test_order_types_then_time_then_audience() -> None:
    broken = claims(exp=NOW - 3600, aud="api://other")
    assert check(broken) is Reason.EXPIRED
    broken["iat"] = "yesterday"
    assert check(broken) is Reason.INVALID_CLAIM
    del broken["jti"]
    assert check(broken) is Reason.MISSING_CLAIM
    assert check(claims(exp=NOW - 3600, nbf=NOW + 3600)) is Reason.EXPIRED
    assert check(claims(nbf=NOW + 3600, iat=NOW + 3600)) is Reason.NOT_YET_VALID


# --- extra claims and construction -------------------------------------------------------------


def test_extra_claims_parse() -> None:
    assert validate_extra_claims("") == {}
    assert validate_extra_claims('{"role":"admin","n":[1,{"a":"é"}]}') == {
        "role": "admin",
        "n": [1, {"a": "é"}],
    }


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '"x"',
        "1",
        "null",
        "not json",
        '{"a":1,"a":2}',
        '{"a":NaN}',
        '{"a":"\\ud800"}',
        '{"a":"\ud800"}',
        "[" * 100 + "]" * 100,
        '{"a":' + "[" * 40 + "]" * 40 + "}",
    ],
)
def test_extra_claims_refused(text: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_extra_claims(text)
    assert exc.value.reason is ErrorReason.INVALID_CLAIMS


def test_extra_claims_size() -> None:
    body = json.dumps({"x": "a" * 8000})
    assert len(body) <= 8192 and validate_extra_claims(body)
    with pytest.raises(InvalidRequest) as exc:
        validate_extra_claims(json.dumps({"x": "a" * 8200}))
    assert exc.value.reason is ErrorReason.INVALID_CLAIMS
    # The bound is in UTF-8 bytes, not characters.
    with pytest.raises(InvalidRequest):
        validate_extra_claims(json.dumps({"x": "é" * 4100}, ensure_ascii=False))
    with pytest.raises(InvalidRequest):
        validate_extra_claims('{"x":1}', max_bytes=6)


@pytest.mark.parametrize("name", sorted(RESERVED_CLAIMS))
def test_reserved_claims_refused(name: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        validate_extra_claims(json.dumps({"ok": 1, name: "x"}))
    assert exc.value.reason is ErrorReason.RESERVED_CLAIM
    assert exc.value.field == name


def test_reserved_set() -> None:
    registered = {"iss", "sub", "aud", "exp", "nbf", "iat", "jti"}
    assert registered | {"tenant"} <= RESERVED_CLAIMS


def build(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "issuer": "https://i.example",
        "subject": "alice",
        "audience": [AUD],
        "issued_at": NOW,
        "lifetime": 600,
        "jti": "j1",
        "extra": {"role": "admin"},
    }
    args.update(overrides)
    return build_claims(**args)


def test_build_claims() -> None:
    c = build()
    assert c == {
        "role": "admin",
        "iss": "https://i.example",
        "sub": "alice",
        "aud": AUD,
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + 600,
        "jti": "j1",
    }
    assert check(c) is None
    many = build(audience=["a", "b"], scope="read write", client_id="web")
    assert many["aud"] == ["a", "b"]
    assert (many["scope"], many["client_id"]) == ("read write", "web")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"audience": []}, "audience"),
        ({"audience": [""]}, "audience"),
        ({"subject": ""}, "subject"),
        ({"lifetime": 0}, "lifetime"),
        ({"lifetime": -5}, "lifetime"),
        ({"issued_at": MAX_NUMERIC_DATE}, "issued_at"),
        ({"extra": {"exp": 1}}, "exp"),
        ({"extra": {"tenant": "other"}}, "tenant"),
    ],
)
def test_build_claims_refuses(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        build(**overrides)
    assert exc.value.field == field
