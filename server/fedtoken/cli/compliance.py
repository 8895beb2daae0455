"""``fedtoken compliance`` and ``fedtoken keys reconcile``, through KeyAdmin.

    fedtoken compliance [--tenant T] [--json]
    fedtoken keys reconcile [--fix] [--json]

``compliance`` prints every key (algorithm, modulus, exponent, state, age,
next rotation step, the HSM attributes read back now) and every violation,
as a plain-text table (``--json``: the report message). Exit 0 when the
report is clean, 1 on any violation, 2 on a usage or connection error (so a
cron job or CI step can gate on it).

``keys reconcile`` compares the HSM's key objects with Postgres; ``--fix``
destroys orphans and the private halves of keys that can no longer sign,
never a key that may still sign. Exit 0 when nothing is left to act on, 1
when some object remains (reported, or not destroyed).

``cli.main`` registers these with its own helpers (client, JSON output),
passed in rather than imported back, like ``cli.trust``.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from fedtoken.cli import output
from fedtoken_client import FedtokenClient
from fedtoken_client._pb.fedtoken.v1 import common_pb2, key_admin_pb2

Connect = Callable[[argparse.Namespace], FedtokenClient]
Emit = Callable[[Any], None]
Write = Callable[[str], None]


def _as_dict(msg: Message) -> dict[str, Any]:
    # Every field, defaults included: "present": false must show.
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


# --- rendering ------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned plain-text columns, two spaces apart (no dependency, and
    greppable: one row a line)."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def duration(seconds: int) -> str:
    """Compact: 45s, 12m, 5h03m, 31d04h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86_400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86_400}d{seconds % 86_400 // 3600:02d}h"


def hsm_cell(a: key_admin_pb2.HsmAttributes) -> str:
    """"absent", "protected" (sensitive, non-extractable since generation,
    sign-only), or "present:" and what is wrong."""
    if not a.present:
        return "absent"
    wrong = [name for name, bad in (
        ("not-sensitive", not a.sensitive), ("was-not-sensitive", not a.always_sensitive),
        ("extractable", a.extractable), ("was-extractable", not a.never_extractable),
        ("no-sign", not a.sign), ("decrypt", a.decrypt), ("unwrap", a.unwrap)) if bad]
    return "present:" + ",".join(wrong) if wrong else "protected"


def next_cell(k: key_admin_pb2.KeyCompliance, now: int) -> str:
    if not k.next_step:
        return "-"
    if not k.next_step_at:
        return k.next_step
    due = k.next_step_at - now
    return f"{k.next_step} {'in ' + duration(due) if due > 0 else 'due'}"


def render_report(report: key_admin_pb2.ComplianceReport) -> list[str]:
    """The human table: one row per key, then one per violation, then the
    verdict."""
    now = report.generated_at or int(time.time())
    # A private half that should be gone reads "leftover", not "protected".
    leftover = {(v.tenant, v.kid) for t in report.tenants for v in t.violations
                if v.code == "PRIVATE_KEY_AFTER_RETIREMENT"}
    rows = [[k.tenant, k.kid, k.alg, str(k.modulus_bits), str(k.public_exponent),
             common_pb2.KeyState.Name(k.state), duration(k.age_seconds), next_cell(k, now),
             "leftover:" + hsm_cell(k.hsm) if (k.tenant, k.kid) in leftover
             else hsm_cell(k.hsm)]
            for t in report.tenants for k in t.keys]
    out = table(["TENANT", "KID", "ALG", "BITS", "EXP", "STATE", "AGE", "NEXT", "HSM"], rows)
    violations = [*report.violations, *(v for t in report.tenants for v in t.violations)]
    if violations:
        out += ["", *table(["VIOLATION", "TENANT", "KID", "MESSAGE"],
                           [[v.code, v.tenant or "-", v.kid or "-", v.message]
                            for v in violations])]
    out += ["", f"tenants: {len(report.tenants)}  keys: {len(rows)}  audit chain: "
                f"{'intact' if report.audit_chain_ok else 'BROKEN'}",
            "compliant" if report.ok else f"NOT COMPLIANT: {len(violations)} violation(s)"]
    return out


def render_reconcile(report: key_admin_pb2.ReconcileKeysReport, fix: bool) -> list[str]:
    out = [f"HSM objects: {report.hsm_objects}  records: {report.records}"]
    if not report.objects:
        return [*out, "HSM and Postgres agree"]
    headers = ["PROBLEM", "HSM LABEL", "KID", *(["DESTROYED"] if fix else [])]
    rows = [[o.problem, o.hsm_label, o.kid or "-", *(["yes" if o.destroyed else "no"]
                                                      if fix else [])]
            for o in report.objects]
    out += ["", *table(headers, rows)]
    if not fix:
        out.append("run with --fix to destroy NO_RECORD and NOT_SIGNING objects "
                   "(MISSING is only reported)")
    return out


# --- commands -----------------------------------------------------------------------------


def run_compliance(ns: argparse.Namespace, *, connect: Connect, emit: Emit,
                   write: Write = print) -> int:
    with connect(ns) as c, output.current().progress("reading every key's HSM attributes"):
        report: key_admin_pb2.ComplianceReport = c.compliance_report(tenant=ns.tenant)
    if ns.json:
        emit(_as_dict(report))
    else:
        for line in render_report(report):
            write(line)
    return 0 if report.ok else 1


def run_reconcile(ns: argparse.Namespace, *, connect: Connect, emit: Emit,
                  write: Write = print) -> int:
    what = "reconciling HSM objects with Postgres" + (" (destroying orphans)" if ns.fix else "")
    with connect(ns) as c, output.current().progress(what):
        report: key_admin_pb2.ReconcileKeysReport = c.reconcile_keys(fix=ns.fix)
    if ns.json:
        emit(_as_dict(report))
    else:
        for line in render_reconcile(report, ns.fix):
            write(line)
    return 1 if any(not o.destroyed for o in report.objects) else 0


def _keys_subparsers(subparsers: Any) -> Any:
    """The ``keys`` command's own subparsers action (cli.main made it)."""
    keys = subparsers.choices["keys"]
    return next(a for a in keys._actions if isinstance(a, argparse._SubParsersAction))


def register(subparsers: Any, *, connect: Connect, emit: Emit, keys: Any = None) -> None:
    """Add ``compliance`` to the top-level commands and ``reconcile`` to
    ``keys`` (``keys``: that command's subparsers; found by name when not
    given, so ``keys`` must be registered first)."""
    cp = subparsers.add_parser(
        "compliance", help="every key's algorithm, size, age, state and HSM protection, and "
        "every policy violation; exit 1 on any violation")
    cp.add_argument("--tenant", default="", help="only this tenant (default: every tenant "
                    "you may read)")
    cp.add_argument("--json", action="store_true", help="print the report as JSON")
    cp.set_defaults(func=functools.partial(run_compliance, connect=connect, emit=emit))

    rc = (keys if keys is not None else _keys_subparsers(subparsers)).add_parser(
        "reconcile", help="compare HSM key objects with Postgres; --fix destroys orphans "
        "(never a key that may sign)")
    rc.add_argument("--fix", action="store_true",
                    help="destroy HSM objects with no record, and private halves of keys "
                         "that can no longer sign (audited)")
    rc.add_argument("--json", action="store_true", help="print the report as JSON")
    rc.set_defaults(func=functools.partial(run_reconcile, connect=connect, emit=emit))
