"""The catalog: reload coalescing, change notices, the tenant miss path, the
cached key sets and the key table it feeds. Over MemoryStore (tests/unit/fakes.py).

No timings: concurrency is arranged with the store's ``load_gate`` and by
waiting for the catalog's own reload tasks, never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pytest

from fedtoken.core.errors import NoActiveKey, PolicyViolation, StoreUnavailable, TenantNotFound
from fedtoken.core.jwk import rsa_public_jwk
from fedtoken.core.jwks import etag
from fedtoken.core.model import KeyRecord, KeyState, Tenant, TenantPolicy
from fedtoken.service import Catalog
from tests.unit.fakes import NOW, FakeClock, MemoryStore, RecordingTable, issuer_for, rsa_key

MAX_AGE = 300


def key(name: str, tenant: str, state: KeyState, created_at: int = NOW) -> KeyRecord:
    numbers = rsa_key(f"catalog-{name}").public_key().public_numbers()
    jwk = rsa_public_jwk(numbers.n, numbers.e)
    return KeyRecord(kid=jwk["kid"], tenant=tenant, alg="RS256", key_size=2048, state=state,
                     public_jwk=jwk, hsm_label=f"fedtoken/{tenant}/{jwk['kid']}",
                     created_at=created_at)


@dataclass
class Env:
    store: MemoryStore
    table: RecordingTable
    catalog: Catalog

    async def add_tenant(self, tenant_id: str) -> Tenant:
        return await self.store.tenants.create(Tenant(tenant_id, issuer_for(tenant_id)),
                                               now=datetime.fromtimestamp(NOW, UTC))

    @property
    def store_calls(self) -> int:
        return sum(self.store.calls.values())


async def settle() -> None:
    """Wait until every reload the catalog started in the background is done."""
    while pending := [t for t in asyncio.all_tasks()
                      if t.get_name() == "catalog-reload" and not t.done()]:
        await asyncio.wait(pending)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    store = MemoryStore(FakeClock())
    table = RecordingTable()
    catalog = Catalog(store, table, default_tenant="acme", jwks_max_age=MAX_AGE)
    e = Env(store, table, catalog)
    await e.add_tenant("acme")
    await store.keys.insert(key("active", "acme", KeyState.ACTIVE))
    await catalog.reload()
    yield e
    await catalog.close()


# --- coalescing -------------------------------------------------------------------


async def test_concurrent_reloads_cause_at_most_two_loads(env: Env) -> None:
    before = env.store.loads
    await asyncio.gather(*(env.catalog.reload() for _ in range(20)))
    assert 1 <= env.store.loads - before <= 2
    assert env.catalog.reloads == env.store.loads


async def test_reloads_requested_while_a_load_runs_share_one_more_load(env: Env) -> None:
    before = env.store.loads
    gate = asyncio.Event()
    env.store.load_gate = gate
    first = asyncio.create_task(env.catalog.reload())
    while env.store.loads == before:  # the first load has read the tenants
        await asyncio.sleep(0)
    waiting = [asyncio.create_task(env.catalog.reload()) for _ in range(20)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *waiting)
    assert env.store.loads - before == 2


async def test_a_reload_asked_after_a_change_sees_it_even_while_a_load_runs(env: Env) -> None:
    gate = asyncio.Event()
    env.store.load_gate = gate
    before = env.store.loads
    stale = asyncio.create_task(env.catalog.reload())
    while env.store.loads == before:  # that load read the tenants before the change
        await asyncio.sleep(0)
    env.store.load_gate = None
    await env.add_tenant("beta")
    mine = asyncio.create_task(env.catalog.reload())
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(stale, mine)
    assert env.catalog.find("beta") is not None


async def test_a_failed_load_is_not_counted_as_served(env: Env) -> None:
    await env.add_tenant("beta")
    env.store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await env.catalog.reload()
    assert env.catalog.find("beta") is None  # the old snapshot stays
    assert env.catalog.find("acme") is not None
    env.store.unavailable = False
    await env.catalog.reload()
    assert env.catalog.find("beta") is not None


# --- notices ----------------------------------------------------------------------


async def test_a_notice_the_snapshot_already_reflects_causes_no_reload(env: Env) -> None:
    (record,) = env.catalog.keys_of("acme")
    loads, reloads = env.store.loads, env.catalog.reloads
    env.catalog.notice({"type": "keys", "tenant": "acme", "kid": record.kid, "state": "ACTIVE"})
    acme = env.store.data.tenants["acme"]
    env.catalog.notice({"type": "tenant", "tenant": "acme", "issuer": acme.issuer,
                        "max_token_lifetime_s": acme.policy.max_token_lifetime_seconds,
                        "default_token_lifetime_s": acme.policy.default_token_lifetime_seconds,
                        "allowed_algorithms": list(acme.policy.allowed_algorithms),
                        "key_size": acme.policy.key_size})
    env.catalog.notice({"type": "something-else"})
    await settle()
    assert (env.store.loads, env.catalog.reloads) == (loads, reloads)


async def test_a_notice_for_an_unknown_kid_causes_exactly_one_reload(env: Env) -> None:
    new = await env.store.keys.insert(key("pending", "acme", KeyState.PENDING, NOW + 1))
    loads = env.store.loads
    env.catalog.notice({"type": "keys", "tenant": "acme", "kid": new.kid, "state": "PENDING"})
    await settle()
    assert env.store.loads == loads + 1
    assert new.kid in {k.kid for k in env.catalog.keys_of("acme")}
    # Now reflected: the same notice again costs nothing.
    env.catalog.notice({"type": "keys", "tenant": "acme", "kid": new.kid, "state": "PENDING"})
    await settle()
    assert env.store.loads == loads + 1


async def test_a_notice_of_a_new_state_for_a_known_kid_reloads(env: Env) -> None:
    (record,) = env.catalog.keys_of("acme")
    await env.store.keys.set_state(record.kid, KeyState.RETIRING, expected=[KeyState.ACTIVE],
                                   now=datetime.fromtimestamp(NOW, UTC))
    loads = env.store.loads
    env.catalog.notice({"type": "keys", "tenant": "acme", "kid": record.kid,
                        "state": "RETIRING"})
    await settle()
    assert env.store.loads == loads + 1
    with pytest.raises(NoActiveKey):
        env.catalog.active_key(await env.catalog.tenant("acme"))


async def test_a_notice_for_an_unknown_tenant_causes_one_reload(env: Env) -> None:
    await env.add_tenant("beta")
    loads = env.store.loads
    env.catalog.notice({"type": "tenant", "tenant": "beta"})
    await settle()
    assert env.store.loads == loads + 1
    assert env.catalog.find("beta") is not None


async def test_a_notice_for_a_changed_tenant_policy_reloads(env: Env) -> None:
    tighter = TenantPolicy(max_token_lifetime_seconds=600, default_token_lifetime_seconds=300)
    env.store.data.tenants["acme"] = replace(env.store.data.tenants["acme"], policy=tighter)
    issuer = env.store.data.tenants["acme"].issuer
    env.catalog.notice({"type": "tenant", "tenant": "acme", "issuer": issuer,
                        "max_token_lifetime_s": 600, "default_token_lifetime_s": 300,
                        "allowed_algorithms": ["RS256"], "key_size": tighter.key_size})
    await settle()
    tenant = env.catalog.find("acme")
    assert tenant is not None and tenant.policy == tighter


async def test_a_failed_background_reload_is_logged_not_raised(
    env: Env, caplog: pytest.LogCaptureFixture,
) -> None:
    env.store.unavailable = True
    env.catalog.notice({"type": "keys", "tenant": "acme", "kid": "unknown", "state": "ACTIVE"})
    await settle()
    assert "periodic resync will retry" in caplog.text


# --- the tenant miss path ---------------------------------------------------------


async def test_a_tenant_created_elsewhere_is_found_with_one_reload(env: Env) -> None:
    await env.add_tenant("beta")  # by another replica: no notice has arrived yet
    assert env.catalog.find("beta") is None
    loads, gets = env.store.loads, env.store.calls["tenants.get"]
    tenant = await env.catalog.tenant("beta")
    assert tenant.issuer == issuer_for("beta")
    assert (env.store.loads, env.store.calls["tenants.get"]) == (loads + 1, gets + 1)
    await env.catalog.tenant("beta")
    assert (env.store.loads, env.store.calls["tenants.get"]) == (loads + 1, gets + 1)


async def test_an_unknown_tenant_costs_one_lookup_and_no_reload(env: Env) -> None:
    loads, gets = env.store.loads, env.store.calls["tenants.get"]
    with pytest.raises(TenantNotFound) as err:
        await env.catalog.tenant("nope")
    assert err.value.tenant == "nope"
    assert (env.store.loads, env.store.calls["tenants.get"]) == (loads, gets + 1)


@pytest.mark.parametrize("name", ["a\n", "Acme", "../etc/passwd", "a" * 64, "-a", "a b", "é"])
async def test_an_invalid_tenant_name_never_reaches_the_store(env: Env, name: str) -> None:
    calls = env.store_calls
    with pytest.raises(TenantNotFound) as err:
        await env.catalog.tenant(name)
    assert err.value.tenant == ""  # unvalidated input is not echoed
    with pytest.raises(TenantNotFound):
        await env.catalog.key_set(name)
    assert env.store_calls == calls


async def test_an_empty_name_is_the_default_tenant(env: Env) -> None:
    assert (await env.catalog.tenant("")).id == "acme"
    assert env.catalog.default_tenant == "acme"


# --- key sets ---------------------------------------------------------------------


async def test_key_set_publishes_only_published_keys_and_is_cached_per_snapshot(
    env: Env,
) -> None:
    published = {env.catalog.keys_of("acme")[0].kid}
    for i, state in enumerate(KeyState):
        if state is KeyState.ACTIVE:
            continue
        record = await env.store.keys.insert(key(state.value, "acme", state, NOW + i))
        if state.published:
            published.add(record.kid)
    await env.catalog.reload()

    first = await env.catalog.key_set("acme")
    assert await env.catalog.key_set("acme") is first  # rendered once per snapshot
    assert await env.catalog.key_set("") is first
    document = json.loads(first.jwks_json)
    assert {k["kid"] for k in document["keys"]} == published
    assert {k.kid for k in first.keys} == published
    assert all(set(k) == {"kty", "use", "alg", "kid", "n", "e"} for k in document["keys"])
    assert first.etag == etag(first.jwks_json)
    assert first.max_age == MAX_AGE
    assert first.algorithms == ("RS256",)
    assert first.tenant.id == "acme"

    await env.catalog.reload()  # a new snapshot, same keys
    second = await env.catalog.key_set("acme")
    assert second is not first
    assert (second.jwks_json, second.etag) == (first.jwks_json, first.etag)

    await env.store.keys.insert(key("another", "acme", KeyState.PENDING, NOW + 100))
    await env.catalog.reload()
    assert (await env.catalog.key_set("acme")).etag != first.etag


async def test_key_sets_are_per_tenant(env: Env) -> None:
    await env.add_tenant("beta")
    beta_key = await env.store.keys.insert(key("beta", "beta", KeyState.ACTIVE))
    await env.catalog.reload()
    beta = await env.catalog.key_set("beta")
    acme = await env.catalog.key_set("acme")
    assert [k.kid for k in beta.keys] == [beta_key.kid]
    assert beta_key.kid not in acme.jwks_json.decode()


# --- the key table ----------------------------------------------------------------


async def test_the_key_table_receives_every_snapshot(env: Env) -> None:
    tenants, keys = env.table.snapshots[-1]
    assert [t.id for t in tenants] == ["acme"]
    assert [k.kid for k in keys] == [k.kid for k in env.catalog.keys_of("acme")]

    await env.add_tenant("beta")
    new = await env.store.keys.insert(key("beta", "beta", KeyState.ACTIVE))
    await env.catalog.reload()
    tenants, keys = env.table.snapshots[-1]
    assert sorted(t.id for t in tenants) == ["acme", "beta"]
    assert new in keys
    assert len(env.table.snapshots) == env.catalog.reloads


async def test_a_snapshot_the_key_table_refuses_is_not_installed(env: Env) -> None:
    await env.add_tenant("beta")
    env.table.fail = PolicyViolation("issuer configured twice")
    with pytest.raises(PolicyViolation):
        await env.catalog.reload()
    # The verifier did not take it, so neither does the catalog: nothing signs
    # with a key the verifier cannot check.
    assert env.catalog.find("beta") is None
    env.table.fail = None
    await env.catalog.reload()
    assert env.catalog.find("beta") is not None


async def test_active_key_is_the_one_active_key(env: Env) -> None:
    tenant = await env.catalog.tenant("acme")
    (record,) = env.catalog.keys_of("acme")
    assert env.catalog.active_key(tenant) == record
    await env.add_tenant("beta")
    await env.store.keys.insert(key("beta-pending", "beta", KeyState.PENDING))
    await env.catalog.reload()
    with pytest.raises(NoActiveKey) as err:
        env.catalog.active_key(await env.catalog.tenant("beta"))
    assert err.value.tenant == "beta"
