"""The verified-token cache on foreign (trusted issuer) tokens: a cached
token stops verifying once its issuer's JWKS drops or replaces the key, or
its trust is withdrawn."""

from __future__ import annotations

from fedtoken.core.model import Expectation, Reason, foreign_ref
from tests.unit._world import AUDIENCE
from tests.unit.test_federation_engine import fkey, kid, token, world

__all__ = ["world"]

EXPECT = Expectation(audience=AUDIENCE, tenant="acme")


def test_foreign_key_removed_after_caching(world) -> None:  # type: ignore[no-untyped-def]
    engine, trusted, _ = world
    t = token("f1", kid("f1"))
    assert engine.verify(t, EXPECT).valid
    assert engine.verify(t, EXPECT).valid
    trusted.keys.clear()
    assert engine.verify(t, EXPECT).reason is Reason.UNKNOWN_KEY


def test_foreign_jwks_replaced_under_the_same_kid(world) -> None:  # type: ignore[no-untyped-def]
    engine, trusted, _ = world
    t = token("f1", kid("f1"))
    assert engine.verify(t, EXPECT).valid
    impostor = fkey("f2")
    from dataclasses import replace

    trusted.keys = {kid("f1"): replace(impostor, kid=kid("f1"))}
    assert engine.verify(t, EXPECT).reason is Reason.BAD_SIGNATURE


def test_foreign_trust_withdrawn_after_caching(world) -> None:  # type: ignore[no-untyped-def]
    engine, trusted, revocations = world
    t = token("f1", kid("f1"))
    assert engine.verify(t, EXPECT).valid
    trusted.tenants = frozenset()
    assert engine.verify(t, EXPECT).reason is Reason.UNTRUSTED_ISSUER
    trusted.tenants = frozenset({"acme"})
    trusted.audiences = frozenset({"only-this"})
    assert engine.verify(t, EXPECT).reason is Reason.AUDIENCE_MISMATCH
    trusted.audiences = frozenset()
    assert engine.verify(t, EXPECT).valid
    revocations.kids.add(foreign_ref("https://partner.example", kid("f1")))
    assert engine.verify(t, EXPECT).reason is Reason.KEY_REVOKED
