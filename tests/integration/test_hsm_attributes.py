"""What reconciliation and the compliance report read from the HSM, against
a real SoftHSM token: every key object's label, a private key's attributes
read back now, and destroying the private half only.

The token is shared by the whole test process, so each test uses a tenant
name of its own (labels are ``fedtoken/{tenant}/{kid}``) and asserts only
about its own labels.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from fedtoken.core.errors import HsmUnavailable, InvalidRequest
from fedtoken.core.ports import GeneratedKey, HsmKeyAttributes
from fedtoken.hsm import LABEL_PREFIX, Pkcs11Hsm
from fedtoken.hsm.devtoken import DevToken
from tests._hsm_fixture import hsm_devtoken  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hsm(hsm_devtoken: DevToken) -> Iterator[Pkcs11Hsm]:  # noqa: F811
    with Pkcs11Hsm(hsm_devtoken.hsm_config()) as instance:
        yield instance


@pytest.fixture
def tenant() -> str:
    return f"attrs-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def key(hsm: Pkcs11Hsm, tenant: str) -> Iterator[GeneratedKey]:
    generated = hsm.generate_rsa_keypair(tenant)
    yield generated
    hsm.destroy_key(generated.hsm_label)


def _own(labels: list[str], tenant: str) -> list[str]:
    return [label for label in labels if label.startswith(f"{LABEL_PREFIX}{tenant}/")]


def test_a_fresh_key_is_present_sensitive_non_extractable_and_sign_only(
        hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    assert hsm.read_key_attributes(key.hsm_label) == HsmKeyAttributes(
        present=True, sensitive=True, extractable=False, sign=True, decrypt=False,
        unwrap=False, never_extractable=True, always_sensitive=True)


def test_all_key_labels_lists_both_halves_sorted_and_only_fedtoken_keys(
        hsm: Pkcs11Hsm, tenant: str) -> None:
    first = hsm.generate_rsa_keypair(tenant)
    second = hsm.generate_rsa_keypair(tenant)
    try:
        labels = hsm.all_key_labels()
        assert _own(labels, tenant) == sorted([first.hsm_label, second.hsm_label])
        assert labels == sorted(labels)
        assert all(label.startswith(LABEL_PREFIX) for label in labels)
        # The checkpoint key (another prefix) is never a tenant key object.
        hsm.find_checkpoint_key()
        assert all(label.startswith(LABEL_PREFIX) for label in hsm.all_key_labels())
        # A label whose private half is gone is still listed: its public half is there.
        hsm.destroy_private_key(first.hsm_label)
        assert first.hsm_label in hsm.all_key_labels()
        assert first.hsm_label not in hsm.list_labels()  # the private-key listing
    finally:
        hsm.destroy_key(first.hsm_label)
        hsm.destroy_key(second.hsm_label)
    assert _own(hsm.all_key_labels(), tenant) == []


def test_after_destroy_private_key_the_public_half_remains(
        hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    hsm.destroy_private_key(key.hsm_label)
    assert hsm.read_key_attributes(key.hsm_label) == HsmKeyAttributes(present=False)
    # The public key is still readable (it stays in the JWKS for the grace) ...
    assert hsm.public_jwk(key.hsm_label) == key.public_jwk
    # ... and nothing can sign with the key any more.
    with pytest.raises(HsmUnavailable):
        hsm.sign_many(key.hsm_label, key.kid, [b"after destruction"])


def test_destroy_private_key_is_idempotent(hsm: Pkcs11Hsm, key: GeneratedKey) -> None:
    hsm.destroy_private_key(key.hsm_label)
    hsm.destroy_private_key(key.hsm_label)
    assert hsm.read_key_attributes(key.hsm_label).present is False
    assert hsm.public_jwk(key.hsm_label) == key.public_jwk
    # And on a label the token has never held.
    never = f"{LABEL_PREFIX}{key.kid}-never/{key.kid}"
    hsm.destroy_private_key(never)
    assert hsm.read_key_attributes(never) == HsmKeyAttributes(present=False)


async def test_the_signer_port_reads_and_destroys_on_the_worker_thread(
        hsm: Pkcs11Hsm, key: GeneratedKey, tenant: str) -> None:
    assert key.hsm_label in await hsm.key_labels()
    assert (await hsm.key_attributes(key.hsm_label)).present
    await hsm.destroy_private(key.hsm_label)
    assert (await hsm.key_attributes(key.hsm_label)).present is False
    assert _own(await hsm.key_labels(), tenant) == [key.hsm_label]


def test_labels_outside_the_fedtoken_prefix_are_refused(hsm: Pkcs11Hsm) -> None:
    for call in (hsm.read_key_attributes, hsm.destroy_private_key):
        with pytest.raises(InvalidRequest):
            call("checkpoint/not-a-tenant-key")
