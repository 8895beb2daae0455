"""KeyAdmin's GetComplianceReport and ReconcileKeys: proto in, one
``fedtoken.service.compliance.Compliance`` call, proto out.

``ComplianceServicerMixin`` is mixed into ``KeyAdminServicer``, which sets
``self._compliance``; the call context and the error mapping come from the
interceptors, as for every other RPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import grpc

from fedtoken.core.compliance import (
    ComplianceReport,
    HsmFinding,
    KeyFacts,
    ReconcileReport,
    TenantCompliance,
    Violation,
)
from fedtoken.core.errors import FailedPrecondition
from fedtoken.core.ports import HsmKeyAttributes
from fedtoken.rpc import convert
from fedtoken.rpc.interceptors import call_context
from fedtoken_client._pb.fedtoken.v1 import key_admin_pb2

if TYPE_CHECKING:
    from fedtoken.service.compliance import Compliance

Ctx: TypeAlias = grpc.aio.ServicerContext


def hsm_attributes_pb(a: HsmKeyAttributes) -> key_admin_pb2.HsmAttributes:
    return key_admin_pb2.HsmAttributes(
        present=a.present, sensitive=a.sensitive, extractable=a.extractable, sign=a.sign,
        decrypt=a.decrypt, unwrap=a.unwrap, never_extractable=a.never_extractable,
        always_sensitive=a.always_sensitive)


def key_compliance_pb(k: KeyFacts) -> key_admin_pb2.KeyCompliance:
    return key_admin_pb2.KeyCompliance(
        kid=k.kid, tenant=k.tenant, alg=k.alg, modulus_bits=k.modulus_bits,
        public_exponent=k.public_exponent, state=k.state.name,
        age_seconds=k.age_seconds, next_step=k.next_step, next_step_at=k.next_step_at,
        hsm=hsm_attributes_pb(k.hsm))


def violation_pb(v: Violation) -> key_admin_pb2.ComplianceViolation:
    return key_admin_pb2.ComplianceViolation(code=v.code.value, tenant=v.tenant, kid=v.kid,
                                             message=v.message)


def tenant_compliance_pb(t: TenantCompliance) -> key_admin_pb2.TenantCompliance:
    return key_admin_pb2.TenantCompliance(
        tenant=convert.tenant_pb(t.tenant), keys=[key_compliance_pb(k) for k in t.keys],
        violations=[violation_pb(v) for v in t.violations])


def compliance_report_pb(r: ComplianceReport) -> key_admin_pb2.ComplianceReport:
    return key_admin_pb2.ComplianceReport(
        ok=r.ok, generated_at=r.generated_at,
        tenants=[tenant_compliance_pb(t) for t in r.tenants],
        violations=[violation_pb(v) for v in r.violations], audit_chain_ok=r.audit_chain_ok)


def hsm_object_pb(f: HsmFinding) -> key_admin_pb2.HsmObject:
    return key_admin_pb2.HsmObject(hsm_label=f.hsm_label, kid=f.kid, problem=f.problem.value,
                                   destroyed=f.destroyed)


def reconcile_report_pb(r: ReconcileReport) -> key_admin_pb2.ReconcileKeysReport:
    return key_admin_pb2.ReconcileKeysReport(
        objects=[hsm_object_pb(f) for f in r.objects], hsm_objects=r.hsm_objects,
        records=r.records)


class ComplianceServicerMixin:
    """The two compliance RPCs of KeyAdmin. The composing servicer sets
    ``_compliance`` (None: this server has no compliance service, and the
    RPCs answer FAILED_PRECONDITION)."""

    _compliance: Compliance | None = None

    def _compliance_service(self) -> Compliance:
        if self._compliance is None:
            raise FailedPrecondition("this server does not serve compliance reports")
        return self._compliance

    async def GetComplianceReport(self, request: key_admin_pb2.ComplianceReportRequest,
                                  context: Ctx) -> key_admin_pb2.ComplianceReport:
        report = await self._compliance_service().report(request.tenant, call_context())
        return compliance_report_pb(report)

    async def ReconcileKeys(self, request: key_admin_pb2.ReconcileKeysRequest,
                            context: Ctx) -> key_admin_pb2.ReconcileKeysReport:
        done = await self._compliance_service().reconcile(request.fix, call_context())
        return reconcile_report_pb(done)
