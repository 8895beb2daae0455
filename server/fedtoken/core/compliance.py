"""The compliance report and the HSM/Postgres reconciliation, as pure rules.

An auditor must be able to check, from one report, that every key is of an
allowed algorithm and size, that no key signs past its rotation period, that
private keys exist in the HSM exactly while they may sign and with the
protection fedtoken asks for, and that the audit chain is intact. The
service layer (``fedtoken.service.compliance``) reads the facts (records
from Postgres, attributes read back from the HSM now, the chain walk) and
these functions judge them, so every rule is a unit test over plain data.

"May sign" is the one notion both halves share: a key Postgres says may
still sign (PENDING, ACTIVE, or RETIRING while its tenant has no ACTIVE key
to take over) must keep its private half; a key that can no longer sign
(RETIRING with an ACTIVE successor, RETIRED, DESTROYED, COMPROMISED) must
not have one. Reconciliation never destroys a key that may sign, whatever
else it finds. (This is more conservative than the rotation step machine,
which destroys any RETIRING key's private half once it stopped signing. A
RETIRING key with no ACTIVE key beside it is what a compromised successor
or a manual change leaves; the state machine never makes it sign again, but
reconciliation and the report leave that decision to the operator.)

Each key's next step and the lifetime check come from the rotation schedule
(``schedule_next_step``, ``schedule_lifetime_check`` over
``fedtoken.core.rotation``), passed in so that the rules are testable alone.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from fedtoken.core.audit import ChainReport
from fedtoken.core.errors import PolicyViolation
from fedtoken.core.jwk import b64url_to_int
from fedtoken.core.model import MIN_RSA_BITS, KeyRecord, KeyState, Tenant
from fedtoken.core.ports import HsmKeyAttributes
from fedtoken.core.rotation import Timings, plan

DEFAULT_ROTATION_PERIOD_SECONDS: Final = 30 * 86_400
EXPECTED_PUBLIC_EXPONENT: Final = 65_537


class ViolationCode(enum.Enum):
    """What a compliance violation is about; the names are the wire codes
    (``fedtoken.v1.ComplianceViolation.code``)."""

    KEY_TOO_OLD = "KEY_TOO_OLD"
    PRIVATE_KEY_AFTER_RETIREMENT = "PRIVATE_KEY_AFTER_RETIREMENT"
    HSM_ATTRIBUTES = "HSM_ATTRIBUTES"
    MISSING_KEY = "MISSING_KEY"
    WEAK_KEY = "WEAK_KEY"
    NO_ACTIVE_KEY = "NO_ACTIVE_KEY"
    LIFETIME_NOT_COVERED = "LIFETIME_NOT_COVERED"
    AUDIT_CHAIN_BROKEN = "AUDIT_CHAIN_BROKEN"


@dataclass(frozen=True, slots=True)
class Violation:
    code: ViolationCode
    message: str
    tenant: str = ""
    kid: str = ""


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """What the report says about one key. ``modulus_bits`` and
    ``public_exponent`` come from the published JWK (0 when unreadable), so
    they describe what verifiers actually use."""

    kid: str
    tenant: str
    alg: str
    modulus_bits: int
    public_exponent: int
    state: KeyState
    age_seconds: int
    may_sign: bool
    next_step: str = ""
    next_step_at: int = 0
    hsm: HsmKeyAttributes = field(default_factory=lambda: HsmKeyAttributes(present=False))


@dataclass(frozen=True, slots=True)
class TenantCompliance:
    tenant: Tenant
    keys: tuple[KeyFacts, ...]
    violations: tuple[Violation, ...]


@dataclass(frozen=True, slots=True)
class ComplianceReport:
    """``ok`` is True only when there is no violation anywhere."""

    generated_at: int
    tenants: tuple[TenantCompliance, ...]
    violations: tuple[Violation, ...]  # not of one tenant (the audit chain)
    audit_chain_ok: bool

    @property
    def ok(self) -> bool:
        return not self.violations and not any(t.violations for t in self.tenants)

    def all_violations(self) -> list[Violation]:
        return [*self.violations, *(v for t in self.tenants for v in t.violations)]


NextStep = Callable[[Tenant, Sequence[KeyRecord], KeyRecord, int], tuple[str, int]]
"""(tenant, its keys, one key, now) -> (next lifecycle step of that key, Unix
time it is due); ("", 0) when none is scheduled."""
UncoveredLifetime = Callable[[Tenant], str]
"""tenant -> "" when its keys' grace covers its maximum token lifetime, else
why not (the LIFETIME_NOT_COVERED message)."""


def no_next_step(tenant: Tenant, keys: Sequence[KeyRecord], key: KeyRecord,
                 now: int) -> tuple[str, int]:
    """No schedule known: report none."""
    return "", 0


def lifetime_always_covered(tenant: Tenant) -> str:
    """No schedule known: nothing to check the lifetime against."""
    return ""


def schedule_next_step(timings: Timings) -> NextStep:
    """The next step of each key from the rotation step machine
    (``fedtoken.core.rotation.plan``): the earliest step due now, or the
    tenant's one upcoming step, that names the key (as the key it changes,
    or as the active key a GENERATE or ACTIVATE is about). A key whose step
    comes after the tenant's upcoming one shows none yet."""

    def next_step(tenant: Tenant, keys: Sequence[KeyRecord], key: KeyRecord,
                  now: int) -> tuple[str, int]:
        p = tenant.policy
        planned = plan(timings.for_policy(p), keys, now)
        steps = [*planned.due, *([planned.upcoming] if planned.upcoming else [])]
        mine = [st for st in steps if key.kid in (st.kid, st.previous)]
        return (mine[0].kind.value, mine[0].at) if mine else ("", 0)

    return next_step


def schedule_lifetime_check(timings: Timings) -> UncoveredLifetime:
    """LIFETIME_NOT_COVERED when the tenant's stored policy would be refused
    today for its token lifetime (``fedtoken.core.rotation.check_policy``):
    a policy stored before a limit tightened, or written around the API."""

    def uncovered(tenant: Tenant) -> str:
        p = tenant.policy
        try:
            timings.check(p.rotation_period_seconds, p.max_token_lifetime_seconds)
        except PolicyViolation as exc:
            return exc.message if exc.field == "max_token_lifetime" else ""
        return ""

    return uncovered


def rotation_period_of(tenant: Tenant) -> int:
    """The tenant's rotation period (the default for a non-positive one)."""
    period = tenant.policy.rotation_period_seconds
    return period if period > 0 else DEFAULT_ROTATION_PERIOD_SECONDS


# --- may sign ----------------------------------------------------------------------


def may_sign(key: KeyRecord, tenant_keys: Iterable[KeyRecord]) -> bool:
    """Whether Postgres says ``key`` may (still, or soon) sign, so its
    private half must be kept: PENDING, ACTIVE, or RETIRING while no other
    key of its tenant is ACTIVE (its successor has not taken over yet)."""
    if key.state in (KeyState.PENDING, KeyState.ACTIVE):
        return True
    if key.state is KeyState.RETIRING:
        return not any(k.state is KeyState.ACTIVE and k.kid != key.kid
                       and k.tenant == key.tenant for k in tenant_keys)
    return False


def rsa_numbers(jwk: Mapping[str, object]) -> tuple[int, int]:
    """(modulus bits, public exponent) of an RSA public JWK; (0, 0) when it
    is not a readable one (a WEAK_KEY, not an error: the report must finish)."""
    n, e = jwk.get("n"), jwk.get("e")
    if jwk.get("kty") != "RSA" or type(n) is not str or type(e) is not str:
        return 0, 0
    try:
        return b64url_to_int(n).bit_length(), b64url_to_int(e)
    except ValueError:
        return 0, 0


# --- the report ----------------------------------------------------------------------


def key_facts(tenant: Tenant, keys: Sequence[KeyRecord], key: KeyRecord,
              hsm: HsmKeyAttributes, now: int, next_step: NextStep = no_next_step) -> KeyFacts:
    bits, exponent = rsa_numbers(key.public_jwk)
    step, step_at = next_step(tenant, keys, key, now)
    return KeyFacts(
        kid=key.kid, tenant=key.tenant, alg=key.alg, modulus_bits=bits,
        public_exponent=exponent, state=key.state,
        age_seconds=max(0, now - key.created_at) if key.created_at else 0,
        may_sign=may_sign(key, keys), next_step=step, next_step_at=step_at, hsm=hsm)


def weak_attributes(hsm: HsmKeyAttributes) -> list[str]:
    """What is wrong with a present private key's protection: it must be
    sensitive and never have been otherwise, non-extractable and never have
    been extractable, and sign-only (no decrypt, no unwrap)."""
    wrong = []
    if not hsm.sensitive:
        wrong.append("not sensitive")
    if not hsm.always_sensitive:
        wrong.append("was not always sensitive")
    if hsm.extractable:
        wrong.append("extractable")
    if not hsm.never_extractable:
        wrong.append("was extractable")
    if not hsm.sign:
        wrong.append("cannot sign")
    if hsm.decrypt:
        wrong.append("can decrypt")
    if hsm.unwrap:
        wrong.append("can unwrap")
    return wrong


def key_violations(tenant: Tenant, facts: KeyFacts, activated_at: int,
                   now: int) -> list[Violation]:
    """Every rule about one key (see ``ViolationCode``)."""
    found: list[Violation] = []

    def add(code: ViolationCode, message: str) -> None:
        found.append(Violation(code, message, tenant=tenant.id, kid=facts.kid))

    period = rotation_period_of(tenant)
    # Age is measured from activation: the period is how long a key signs;
    # the time it sat pending (pre-publication) does not count against it.
    if facts.state is KeyState.ACTIVE and activated_at and now - activated_at > period:
        add(ViolationCode.KEY_TOO_OLD,
            f"active for {now - activated_at} s, longer than the rotation period of "
            f"{period} s: rotate it (`fedtoken keys rotate --tenant {tenant.id} --now`) "
            "or check why scheduled rotation did not")
    if not facts.may_sign and facts.hsm.present:
        add(ViolationCode.PRIVATE_KEY_AFTER_RETIREMENT,
            f"a {facts.state.value} key that can no longer sign still has its private "
            "half in the HSM: destroy it (`fedtoken keys reconcile --fix`)")
    if facts.may_sign and facts.hsm.present:
        wrong = weak_attributes(facts.hsm)
        if wrong:
            add(ViolationCode.HSM_ATTRIBUTES,
                f"the private key's HSM attributes are wrong ({', '.join(wrong)}): "
                "generate a new key and retire this one")
    if facts.may_sign and not facts.hsm.present:
        add(ViolationCode.MISSING_KEY,
            f"Postgres says this {facts.state.value} key may sign but the HSM has no "
            "private key for it: check the HSM token, or rotate")
    if facts.state.published:
        weak = []
        if facts.modulus_bits < MIN_RSA_BITS:
            weak.append(f"modulus of {facts.modulus_bits} bits (< {MIN_RSA_BITS})")
        e = facts.public_exponent
        if e < 3 or e % 2 == 0:
            weak.append(f"public exponent {e} is even or too small")
        elif e != EXPECTED_PUBLIC_EXPONENT:
            weak.append(f"public exponent {e} is not {EXPECTED_PUBLIC_EXPONENT}")
        if weak:
            add(ViolationCode.WEAK_KEY, f"weak published key: {'; '.join(weak)}")
    return found


def tenant_compliance(tenant: Tenant, keys: Sequence[KeyRecord],
                      hsm: Mapping[str, HsmKeyAttributes], now: int, *,
                      next_step: NextStep = no_next_step,
                      uncovered_lifetime: UncoveredLifetime = lifetime_always_covered,
                      ) -> TenantCompliance:
    """One tenant: its keys' facts and every violation. ``hsm`` maps a key's
    kid to its private key's attributes (missing: not present)."""
    own = [k for k in keys if k.tenant == tenant.id]
    facts: list[KeyFacts] = []
    violations: list[Violation] = []
    for key in sorted(own, key=lambda k: (k.created_at, k.kid)):
        f = key_facts(tenant, own, key, hsm.get(key.kid, HsmKeyAttributes(present=False)),
                      now, next_step)
        facts.append(f)
        violations.extend(key_violations(tenant, f, key.activated_at or key.created_at, now))
    if not any(k.state is KeyState.ACTIVE for k in own):
        violations.append(Violation(
            ViolationCode.NO_ACTIVE_KEY,
            "the tenant has no active key: it cannot issue tokens; generate and activate "
            f"one (`fedtoken keys generate --tenant {tenant.id} --activate`)", tenant=tenant.id))
    why = uncovered_lifetime(tenant)
    if why:
        violations.append(Violation(ViolationCode.LIFETIME_NOT_COVERED, why, tenant=tenant.id))
    return TenantCompliance(tenant=tenant, keys=tuple(facts), violations=tuple(violations))


def chain_violation(chain: ChainReport, *, detailed: bool = True) -> Violation | None:
    """AUDIT_CHAIN_BROKEN when the chain walk failed. ``detailed`` adds where
    (the seq may belong to another tenant's row: only for unscoped callers)."""
    if chain.ok:
        return None
    where = ""
    if detailed and chain.first_bad_seq is not None:
        problem = f" ({chain.problem.value})" if chain.problem else ""
        where = f" at seq {chain.first_bad_seq}{problem}"
    return Violation(ViolationCode.AUDIT_CHAIN_BROKEN,
                     f"the audit hash chain is not intact{where}: run `fedtoken audit verify` "
                     "and compare with the signed checkpoints")


def compliance_report(tenants: Iterable[Tenant], keys: Sequence[KeyRecord],
                      hsm: Mapping[str, HsmKeyAttributes], chain: ChainReport, now: int, *,
                      next_step: NextStep = no_next_step,
                      uncovered_lifetime: UncoveredLifetime = lifetime_always_covered,
                      chain_details: bool = True) -> ComplianceReport:
    """The whole report over the facts read now."""
    per_tenant = tuple(
        tenant_compliance(t, keys, hsm, now, next_step=next_step,
                          uncovered_lifetime=uncovered_lifetime)
        for t in sorted(tenants, key=lambda t: t.id))
    broken = chain_violation(chain, detailed=chain_details)
    return ComplianceReport(generated_at=now, tenants=per_tenant,
                            violations=(broken,) if broken else (), audit_chain_ok=chain.ok)


# --- reconciliation ----------------------------------------------------------------------


class ObjectProblem(enum.Enum):
    """Why reconciliation lists an HSM object (``fedtoken.v1.HsmObject.problem``)."""

    NO_RECORD = "NO_RECORD"  # in the HSM, unknown to Postgres: destroy both halves
    NOT_SIGNING = "NOT_SIGNING"  # its record can no longer sign: destroy the private half
    MISSING = "MISSING"  # Postgres says it may sign, the HSM has no private half: report


@dataclass(frozen=True, slots=True)
class HsmFinding:
    hsm_label: str
    kid: str
    tenant: str
    problem: ObjectProblem
    # Whether ``--fix`` may destroy it: never a key that may sign.
    destroyable: bool
    destroyed: bool = False


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """One reconciliation run: what it found (and, with fix, destroyed), and
    how many HSM objects (labels) and key records it compared."""

    objects: tuple[HsmFinding, ...]
    hsm_objects: int
    records: int


def label_parts(hsm_label: str) -> tuple[str, str]:
    """(tenant, kid) of a ``fedtoken/{tenant}/{kid}`` label; ("", "") else."""
    parts = hsm_label.split("/")
    if len(parts) == 3 and all(parts):
        return parts[1], parts[2]
    return "", ""


def reconcile(labels: Iterable[str], records: Sequence[KeyRecord],
              private_present: Mapping[str, bool]) -> list[HsmFinding]:
    """Compare the HSM's key labels (either half) with the records.

    ``private_present`` maps a record's label to whether its private half
    exists. Unknown (absent) errs on the side that cannot hurt: a key that
    can no longer sign is listed NOT_SIGNING (destroying a private half that
    is already gone is a no-op), and MISSING needs an explicit False. Sorted
    by label.
    """
    by_label: dict[str, KeyRecord] = {r.hsm_label: r for r in records}
    by_tenant: dict[str, list[KeyRecord]] = {}
    for r in records:
        by_tenant.setdefault(r.tenant, []).append(r)
    signing_kids = {r.kid for r in records if may_sign(r, by_tenant[r.tenant])}
    present_labels = set(labels)
    findings: list[HsmFinding] = []
    for label in sorted(present_labels):
        tenant, kid = label_parts(label)
        record = by_label.get(label)
        if record is None:
            # Belt and braces: a label naming the kid of a key that may sign
            # (a record under another label) is never destroyed.
            findings.append(HsmFinding(label, kid, tenant, ObjectProblem.NO_RECORD,
                                       destroyable=kid not in signing_kids))
        elif record.kid not in signing_kids and private_present.get(label, True):
            findings.append(HsmFinding(label, record.kid, record.tenant,
                                       ObjectProblem.NOT_SIGNING, destroyable=True))
    for record in records:
        if record.kid in signing_kids and (record.hsm_label not in present_labels
                                           or private_present.get(record.hsm_label) is False):
            findings.append(HsmFinding(record.hsm_label, record.kid, record.tenant,
                                       ObjectProblem.MISSING, destroyable=False))
    findings.sort(key=lambda f: (f.hsm_label, f.problem.value))
    return findings
