"""The ``fedtoken`` command: run the service, and operate it through KeyAdmin.

Every command except ``serve``, ``doctor`` and ``token decode`` is a client
of the gRPC API (``--target``, or FEDTOKEN_TARGET); none touches the database.
Output: tables on a terminal, JSON with ``--json`` or when piped
(``fedtoken.cli.output``). Exit status: 0 success; 1 a negative verdict or a
violation (invalid or inactive token, broken audit chain, a compliance
violation, a failing doctor check); 2 a usage, connection, TLS or
permission error (one line on stderr saying what to check; docs/cli.md).
"""

from __future__ import annotations

import os

# gRPC's fork handlers only print warnings here (we fork just to run pg_ctl
# and softhsm2-util); it reads this once, when grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import base64
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from fedtoken.cli import errors, output
from fedtoken.cli.compliance import register as register_compliance
from fedtoken.cli.durations import duration, expires_in, since
from fedtoken.cli.output import Columns
from fedtoken.cli.trust import add_trust_commands
from fedtoken.core.errors import FedtokenError
from fedtoken_client import FedtokenClient, FedtokenRpcError, Tls

if TYPE_CHECKING:
    from fedtoken_client._pb.fedtoken.v1 import key_admin_pb2

DEFAULT_TARGET = "127.0.0.1:50051"


class UsageError(Exception):
    """A command line that cannot work; the message says what to give instead."""


# Table columns (on a terminal) of the list commands; JSON has every field.
KEY_COLUMNS: Columns = [("TENANT", "tenant"), ("KID", "kid"), ("STATE", "state"),
                        ("ALG", "alg"), ("BITS", "key_size"), ("CREATED", "created_at"),
                        ("ACTIVATED", "activated_at"), ("HSM LABEL", "hsm_label")]
TENANT_COLUMNS: Columns = [("ID", "id"), ("ISSUER", "issuer"),
                           ("MAX LIFETIME", "max_token_lifetime_seconds"),
                           ("ROTATION", "rotation_period_seconds"),
                           ("NEXT STEP", "next_rotation_step"),
                           ("AT", "next_rotation_step_at")]
CALLER_COLUMNS: Columns = [("IDENTITY", "identity"), ("ROLE", "role"), ("TENANTS", "tenants"),
                           ("AUDIENCES", "audiences"), ("MAX LIFETIME", "max_lifetime_seconds"),
                           ("GRANTED BY", "granted_by")]
AUDIT_COLUMNS: Columns = [("SEQ", "seq"), ("TIME (us)", "time_us"), ("TYPE", "event_type"),
                          ("TENANT", "tenant"), ("ACTOR", "actor"), ("OUTCOME", "outcome"),
                          ("REASON", "reason"), ("SUBJECT", "subject"), ("KID", "kid")]
JWK_COLUMNS: Columns = [("KID", "kid"), ("KTY", "kty"), ("ALG", "alg"), ("USE", "use")]


def _print(msg: Message | dict[str, Any] | list[Any], columns: Columns | None = None, *,
           title: str = "") -> None:
    if isinstance(msg, Message):
        data: Any = MessageToDict(msg, preserving_proto_field_name=True,
                                  always_print_fields_with_no_presence=True)
    else:
        data = msg
    output.current().emit(data, columns, title=title)


def _emit(data: Any) -> None:
    """The emitter handed to cli.trust and cli.compliance."""
    _print(data)


# -- serve -----------------------------------------------------------------------


def _serve_options(s: argparse.ArgumentParser) -> None:
    """The settings flags of ``serve`` (``doctor`` takes the same ones)."""
    s.add_argument("--config", type=Path, default=None,
                   help="TOML settings file (env FEDTOKEN_CONFIG)")
    s.add_argument("--state-dir", dest="state_dir")
    s.add_argument("--grpc-host")
    s.add_argument("--grpc-port", type=int)
    s.add_argument("--http-host")
    s.add_argument("--http-port", type=int)
    s.add_argument("--dsn", help="Postgres DSN; default: embedded Postgres under the state dir")
    s.add_argument("--workers", type=int, help="worker processes (0: one per core)")
    s.add_argument("--log-level")


def serve_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings the ``serve`` flags override (None: not given)."""
    return {
        "state_dir": ns.state_dir or ns.global_state_dir,
        "grpc_host": ns.grpc_host,
        "grpc_port": ns.grpc_port,
        "http_host": ns.http_host,
        "http_port": ns.http_port,
        "database_dsn": ns.dsn,
        "workers": ns.workers,
        "log_level": ns.log_level,
    }


def cmd_serve(ns: argparse.Namespace) -> int:
    from fedtoken.config import load_settings
    from fedtoken.serve import run

    settings = load_settings(serve_overrides(ns), config_file=ns.config)
    return run(settings)  # configures logging (settings.log_format, log_level)


# -- client commands ----------------------------------------------------------------


def _state_dir(ns: argparse.Namespace) -> Path:
    return Path(ns.global_state_dir or os.environ.get("FEDTOKEN_STATE_DIR") or ".state")


def _tls(ns: argparse.Namespace) -> Tls | None:
    """--tls-* options, else FEDTOKEN_TLS_*, else the dev PKI's operator
    certificate under the state directory; None only with --insecure."""
    if ns.insecure:
        return None
    given = (ns.tls_ca, ns.tls_cert, ns.tls_key)
    if any(given):
        if not all(given):
            raise UsageError("give all of --tls-ca, --tls-cert and --tls-key")
        return _checked(Tls(ns.tls_ca, ns.tls_cert, ns.tls_key,
                            server_name=ns.tls_server_name))
    try:
        from_env = Tls.from_env()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if from_env is not None:
        return _checked(from_env)
    dev = _state_dir(ns) / "tls"
    if (dev / "operator.pem").exists():
        return _checked(Tls(dev / "ca.pem", dev / "operator.pem", dev / "operator.key",
                            server_name=ns.tls_server_name))
    raise UsageError(
        f"no client certificate: give --tls-ca/--tls-cert/--tls-key (or FEDTOKEN_TLS_CA/CERT/"
        f"KEY), or run `fedtoken serve` once so the dev certificates exist under {dev}")


def _checked(tls: Tls) -> Tls:
    """The TLS files exist and are in their validity window (a clear line
    now, rather than a handshake failure later)."""
    problem = errors.check_client_files(tls.ca, tls.cert, tls.key)
    if problem:
        raise UsageError(problem)
    return tls


def _client(ns: argparse.Namespace) -> FedtokenClient:
    tls = _tls(ns)
    if tls is not None:  # named in the error line should the handshake fail
        ns.tls_files = f"CA {tls.ca} and client certificate {tls.cert}"
    return FedtokenClient(ns.target, tls=tls, insecure=ns.insecure,
                          caller=ns.caller or f"cli:{os.getenv('USER', 'unknown')}")


def cmd_callers(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        if ns.action == "list":
            _print([MessageToDict(g, preserving_proto_field_name=True)
                    for g in c.list_callers()], CALLER_COLUMNS)
        elif ns.action == "grant":
            _print(c.grant_caller(ns.identity, ns.role, tenants=ns.tenant or (),
                                  audiences=ns.audience or (),
                                  max_lifetime_seconds=ns.max_lifetime))
        else:
            _print({"removed": c.revoke_caller(ns.identity, ns.role or "")})
    return 0


def cmd_dev_cert(ns: argparse.Namespace) -> int:
    from fedtoken.tls import issue_client_cert

    out = Path(ns.out)
    files = issue_client_cert(_state_dir(ns), ns.identity, out, days=ns.days)
    ca = _state_dir(ns) / "tls" / "ca.pem"
    (out / "ca.pem").write_bytes(ca.read_bytes())
    _print({"identity": ns.identity, "cert": str(files.cert), "key": str(files.key),
            "ca": str(out / "ca.pem")})
    return 0


def cmd_tenants(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        if ns.action == "list":
            _print([MessageToDict(t, preserving_proto_field_name=True) for t in c.list_tenants()],
                   TENANT_COLUMNS)
        elif ns.action == "create":
            policy: dict[str, Any] = {}
            if ns.max_lifetime:
                policy["max_token_lifetime_seconds"] = ns.max_lifetime
            if ns.default_lifetime:
                policy["default_token_lifetime_seconds"] = ns.default_lifetime
            if ns.key_size:
                policy["key_size"] = ns.key_size
            if ns.rotation_period:
                policy["rotation_period_seconds"] = ns.rotation_period
            with output.current().progress(f"creating tenant {ns.id}"
                                           + ("" if ns.no_key else " and its first HSM key")):
                made = c.create_tenant(ns.id, ns.issuer or "", generate_key=not ns.no_key,
                                       **policy)
            _print_tenant(made)
        elif ns.action == "update":
            _print_tenant(c.update_tenant(
                ns.id, rotation_period_seconds=ns.rotation_period,
                max_token_lifetime_seconds=ns.max_lifetime,
                default_token_lifetime_seconds=ns.default_lifetime))
        else:
            from fedtoken_client._pb.fedtoken.v1 import key_admin_pb2

            _print_tenant(c._call(c.admin.GetTenant, key_admin_pb2.GetTenantRequest(id=ns.id)))
    return 0


def _print_tenant(tenant: Any) -> None:
    """The tenant, and its derived rotation timings spelled out (the JSON
    has the numbers; the note says what they promise)."""
    _print(tenant)
    if tenant.rotation_period_seconds:
        output.current().note(
              f"# rotation: a new key every {tenant.rotation_period_seconds} s, published "
              f"{tenant.prepublish_seconds} s before it signs; after it stops signing it stays "
              f"published {tenant.grace_seconds} s (max token lifetime "
              f"{tenant.max_token_lifetime_seconds} s + JWKS max-age "
              f"{tenant.jwks_max_age_seconds} s + leeway), then is unpublished; its private "
              "half is destroyed as soon as its successor signs")
        if tenant.next_rotation_step:
            output.current().note(f"# next step: {tenant.next_rotation_step} at "
                                  f"{tenant.next_rotation_step_at} (Unix seconds)")


def cmd_keys(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        if ns.action == "list":
            _print([MessageToDict(k, preserving_proto_field_name=True)
                    for k in c.list_keys(ns.tenant)], KEY_COLUMNS)
        elif ns.action == "generate":
            with output.current().progress("generating an RSA key in the HSM"):
                made = c.generate_key(ns.tenant, key_size=ns.size, activate=ns.activate)
            _print(made)
        elif ns.action == "activate":
            _print(c.activate_key(ns.kid, ns.tenant))
        elif ns.action == "retire":
            _print(c.retire_key(ns.kid, ns.tenant, emergency=ns.emergency))
        elif ns.action == "rotate":
            if not ns.now:
                raise UsageError("keys rotate: rotation follows the tenant's schedule (tenants "
                                 "update --rotation-period); pass --now for an emergency "
                                 "rotation")
            with output.current().progress("rotating: generating the new key in the HSM"):
                rotated = c.rotate_key(ns.tenant, reason=ns.reason)
            _print(rotated)
    return 0


def cmd_token(ns: argparse.Namespace) -> int:
    if ns.action == "decode":
        return _decode(ns.token)
    with _client(ns) as c:
        if ns.action == "issue":
            claims = json.loads(ns.claims) if ns.claims else None
            resp = c.issue(ns.sub, ns.aud, tenant=ns.tenant, lifetime_seconds=ns.lifetime,
                           claims=claims, scope=ns.scope)
            if ns.json:
                _print(resp)
            else:
                output.current().line(resp.token)
            return 0
        if ns.action == "verify":
            verdict = c.verify(_token_arg(ns.token), ns.aud, issuer=ns.issuer, tenant=ns.tenant)
            out = MessageToDict(verdict, preserving_proto_field_name=True,
                                always_print_fields_with_no_presence=True)
            out.pop("claims_json", None)
            if verdict.valid:
                out["claims"] = json.loads(verdict.claims_json)
            _print(out, title="VALID" if verdict.valid else f"INVALID: {out.get('reason')}")
            return 0 if verdict.valid else 1
        if ns.action == "introspect":
            intro = c.introspect(_token_arg(ns.token))
            _print(intro, title="active" if intro.active else "INACTIVE")
            return 0 if intro.active else 1
        if ns.action == "revoke":
            if sum(bool(x) for x in (ns.token, ns.jti, ns.subject, ns.kid)) != 1:
                raise UsageError("give exactly one of --token, --jti, --subject or --kid")
            if ns.issuer and not (ns.jti or ns.subject):
                raise UsageError("--issuer goes with --jti or --subject")
            _print(c.revoke(token=_token_arg(ns.token) if ns.token else "", jti=ns.jti or "",
                            subject=ns.subject or "", issued_before=ns.issued_before,
                            kid=ns.kid or "", tenant=ns.tenant, reason=ns.reason,
                            issuer=ns.issuer, expires_at=ns.expires_at))
            return 0
        if ns.action == "exchange":
            done = c.exchange(_token_arg(ns.subject_token), ns.aud, tenant=ns.tenant,
                              lifetime_seconds=ns.lifetime, scope=ns.scope)
            if ns.json:
                _print(done)
            else:
                output.current().line(done.access_token)
            return 0
    return 2


def cmd_audit(ns: argparse.Namespace) -> int:
    if ns.action == "verify-archive":
        return _verify_archives(ns)
    with _client(ns) as c:
        if ns.action == "verify":
            with output.current().progress("verifying the audit hash chain"):
                report = c.verify_audit_chain()
                if ns.checkpoints:
                    return _verify_checkpoints(ns, c, report)
            _print(report, title="audit chain intact" if report.ok
                   else f"AUDIT CHAIN BROKEN at row {report.first_bad_seq}: {report.problem}")
            return 0 if report.ok else 1
        after = ns.after
        while True:
            page = c.list_audit(tenant=ns.tenant, event_type=ns.type, subject=ns.subject,
                                since=ns.since, after_seq=after, page_size=ns.limit)
            out = output.current()
            events = [MessageToDict(e, preserving_proto_field_name=True) for e in page.events]
            if out.json:
                for event in events:
                    out.json_line(event)
            elif events or not ns.follow:
                out.emit(events, AUDIT_COLUMNS)
            for e in page.events:
                after = e.seq
            if not ns.follow:
                return 0
            if not page.events:
                time.sleep(1.0)


def _verify_checkpoints(ns: argparse.Namespace, c: FedtokenClient,
                        chain: key_admin_pb2.AuditChainReport) -> int:
    """Every signed checkpoint in --checkpoints must verify with the pinned
    key and still be in the chain (the row at its seq has its hash), and the
    chain must verify; exit 0, else 1 naming the first failing checkpoint.

    Retention may archive rows while this runs (the chain report and the row
    reads are separate calls): a checkpoint whose row went missing is checked
    once more against a fresh chain report, whose anchor then covers it."""
    from fedtoken.core.checkpoint import CheckpointProblem, verify_checkpoints

    keys = _checkpoint_keys(ns)
    checkpoints = Path(ns.checkpoints).read_text(encoding="utf-8", errors="replace")

    def check(chain: key_admin_pb2.AuditChainReport) -> Any:
        hashes: dict[int, bytes | None] = {}

        def row_hash(seq: int) -> bytes | None:
            if seq not in hashes:
                events = c.list_audit(after_seq=seq - 1, page_size=1).events
                hashes[seq] = (bytes.fromhex(events[0].hash)
                               if events and events[0].seq == seq else None)
            return hashes[seq]

        anchor = ((chain.anchor_seq, bytes.fromhex(chain.anchor_hash)) if chain.anchor_seq
                  else None)
        return verify_checkpoints(
            checkpoints.splitlines(), keys, row_hash, chain_ok=chain.ok,
            chain_detail=f"row {chain.first_bad_seq}: {chain.problem}", anchor=anchor)

    report = check(chain)
    if report.problem is CheckpointProblem.ROW_MISSING:
        fresh = c.verify_audit_chain()
        if fresh.anchor_seq > chain.anchor_seq:  # archived meanwhile, not deleted
            chain, report = fresh, check(fresh)
    _print({**report.as_dict(), "pinned_kids": sorted(keys),
            "chain": MessageToDict(chain, preserving_proto_field_name=True,
                                   always_print_fields_with_no_presence=True)},
           title="checkpoints verified" if report.ok else "CHECKPOINTS DO NOT VERIFY")
    return 0 if report.ok else 1


def _checkpoint_keys(ns: argparse.Namespace) -> dict[str, Any]:
    from fedtoken.core.checkpoint import pinned_keys

    key_file = Path(ns.checkpoint_key) if ns.checkpoint_key else (
        _state_dir(ns) / "audit" / "checkpoint-key.jwk")
    return dict(pinned_keys(json.loads(key_file.read_text())))


def _verify_archives(ns: argparse.Namespace) -> int:
    """Offline: each archive proves itself with the pinned checkpoint key;
    given together, they must link up, oldest first (exit 0, else 1)."""
    from fedtoken.audit.archive import read_archive_lines
    from fedtoken.core.archive import verify_archive

    keys = _checkpoint_keys(ns)
    paths = sorted(Path(p) for p in ns.archives)  # names sort in chain order
    reports: list[dict[str, Any]] = []
    previous: tuple[int, bytes] | None = None
    ok = bool(paths)
    for path in paths:
        with output.current().progress(f"verifying {path.name}"):
            report = verify_archive(read_archive_lines(path), keys, expect_prev=previous)
        reports.append({"file": str(path), **report.as_dict()})
        if not report.ok:
            ok = False
            break
        previous = (report.to_seq, report.last_hash)
    _print({"ok": ok, "archives": reports},
           title="archives verified" if ok else "ARCHIVES DO NOT VERIFY")
    return 0 if ok else 1


def cmd_hash_secret(ns: argparse.Namespace) -> int:
    """Print the sha256 digest an introspection_clients entry needs."""
    import hashlib
    import secrets

    secret = sys.stdin.readline().rstrip("\n") if ns.stdin else secrets.token_urlsafe(32)
    if not ns.stdin:
        print(f"secret (give it to the client, store it nowhere else): {secret}")
    print(f"{ns.client_id}:{hashlib.sha256(secret.encode()).hexdigest()}")
    return 0


def cmd_jwks(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        resp = c.get_keys(ns.tenant)
        jwks = json.loads(resp.jwks_json)
        out = output.current()
        if out.json:  # the JWKS as served (key order kept, not sorted)
            out.line(json.dumps(jwks, indent=2))
        else:
            out.emit(jwks.get("keys", []), JWK_COLUMNS)
    return 0


def _token_arg(value: str) -> str:
    return sys.stdin.read().strip() if value == "-" else value


def _decode(token: str) -> int:
    """Show header and payload WITHOUT verifying anything (debugging aid)."""
    token = _token_arg(token)
    parts = token.split(".")
    if len(parts) != 3:
        raise UsageError("not a compact JWS (need three dot-separated parts)")
    try:
        header, payload = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
                           for p in parts[:2])
    except ValueError:
        raise UsageError("header or payload is not base64url JSON") from None
    _print({"UNVERIFIED": True, "header": header, "payload": payload},
           title="UNVERIFIED: nothing about this token was checked")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtoken", description=__doc__.splitlines()[0])
    p.add_argument("--target", default=os.environ.get("FEDTOKEN_TARGET", DEFAULT_TARGET),
                   help="gRPC address of a fedtoken server (env FEDTOKEN_TARGET)")
    p.add_argument("--caller", default="",
                   help="self-declared name, recorded beside the authenticated identity")
    p.add_argument("--state-dir", dest="global_state_dir", default=None,
                   help="state directory whose dev certificates the CLI uses by default "
                        "(env FEDTOKEN_STATE_DIR, default .state)")
    p.add_argument("--tls-ca", default="", help="CA bundle of the server's certificate")
    p.add_argument("--tls-cert", default="", help="client certificate (one SPIFFE ID URI SAN)")
    p.add_argument("--tls-key", default="", help="client private key")
    p.add_argument("--tls-server-name", default="",
                   help="name to check the server's certificate against")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, no client certificate (only an insecure test server)")
    p.add_argument("--json", dest="global_json", action="store_true",
                   help="print JSON even on a terminal (the default when stdout is not one)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server and the HTTP bridge")
    _serve_options(s)
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("tenants", help="list, show or create tenants")
    tsub = t.add_subparsers(dest="action", required=True)
    tsub.add_parser("list")
    show = tsub.add_parser("show")
    show.add_argument("id")
    create = tsub.add_parser("create")
    create.add_argument("id")
    create.add_argument("--issuer", help="issuer URL (default: <public_url>/t/<id>)")
    update = tsub.add_parser("update", help="change the rotation period or token lifetimes")
    update.add_argument("id")
    for policy_parser in (create, update):  # not "p": that is the top-level parser
        policy_parser.add_argument("--max-lifetime", "--max-token-lifetime", type=duration,
                                   default=0, help="maximum token lifetime (900, 90s, 15m, 1h)")
        policy_parser.add_argument("--default-lifetime", "--default-token-lifetime",
                                   type=duration, default=0)
        policy_parser.add_argument("--rotation-period", type=duration, default=0,
                                   help="a new signing key every DURATION (e.g. 30d; default 30d)")
    create.add_argument("--key-size", type=int, default=0)
    create.add_argument("--no-key", action="store_true", help="do not generate a first key")
    t.set_defaults(func=cmd_tenants)

    k = sub.add_parser("keys", help="generate, list, activate, retire HSM keys")
    ksub = k.add_subparsers(dest="action", required=True)
    for name in ("list", "generate", "activate", "retire", "rotate"):
        a = ksub.add_parser(name)
        a.add_argument("--tenant", default="")
        if name == "generate":
            a.add_argument("--size", type=int, default=0)
            a.add_argument("--activate", action="store_true")
        if name in ("activate", "retire"):
            a.add_argument("kid")
        if name == "retire":
            a.add_argument("--emergency", action="store_true",
                           help="retire a RETIRING key before its grace is over: every "
                                "unexpired token it signed fails from now on (audited)")
        if name == "rotate":
            a.add_argument("--now", action="store_true",
                           help="emergency: a new key signs at once, the current one retires "
                                "and its private half is destroyed (audited)")
            a.add_argument("--reason", default="", help="recorded in the audit trail")
    k.set_defaults(func=cmd_keys)

    tok = sub.add_parser("token", help="issue, verify, introspect, revoke, exchange or decode "
                         "tokens")
    tsub2 = tok.add_subparsers(dest="action", required=True)
    iss = tsub2.add_parser("issue")
    iss.add_argument("--sub", required=True)
    iss.add_argument("--aud", required=True, action="append")
    iss.add_argument("--tenant", default="")
    iss.add_argument("--lifetime", type=duration, default=0,
                     help="e.g. 900, 15m, 1h (default: the tenant's)")
    iss.add_argument("--claims", help="extra claims as a JSON object")
    iss.add_argument("--scope", default="")
    iss.add_argument("--json", action="store_true", help="print the whole response")
    ver = tsub2.add_parser("verify")
    ver.add_argument("token", help="the token, or - to read it from stdin")
    ver.add_argument("--aud", required=True)
    ver.add_argument("--issuer", default="")
    ver.add_argument("--tenant", default="")
    intr = tsub2.add_parser("introspect")
    intr.add_argument("token")
    rev = tsub2.add_parser("revoke")
    rev.add_argument("--token")
    rev.add_argument("--jti")
    rev.add_argument("--subject", help="revoke the subject's tokens issued before a time")
    rev.add_argument("--issued-before", dest="issued_before", type=since, default=0,
                     help="with --subject: the cut, Unix seconds or a duration ago (1h; "
                          "default now)")
    rev.add_argument("--expires-in", dest="expires_at", type=expires_in, default=0,
                     metavar="DURATION", help="keep the revocation this long (e.g. 1h, 30d; "
                     "default: until the tokens it covers expire)")
    rev.add_argument("--kid", help="EMERGENCY: the key is compromised; reject all its tokens")
    rev.add_argument("--tenant", default="")
    rev.add_argument("--reason", default="")
    rev.add_argument("--issuer", default="",
                     help="federation: --jti/--subject is this trusted issuer's (revoked in "
                          "--tenant, which must trust it)")
    exc = tsub2.add_parser("exchange", help="RFC 8693: a trusted issuer's token for a "
                           "short-lived local one")
    exc.add_argument("subject_token", help="the foreign token, or - to read it from stdin")
    exc.add_argument("--tenant", required=True, help="a local tenant that trusts its issuer")
    exc.add_argument("--aud", required=True, action="append")
    exc.add_argument("--lifetime", type=duration, default=0,
                     help="e.g. 300, 5m (default: the tenant's)")
    exc.add_argument("--scope", default="")
    exc.add_argument("--json", action="store_true", help="print the whole response")
    dec = tsub2.add_parser("decode", help="print header and payload, UNVERIFIED")
    dec.add_argument("token")
    tok.set_defaults(func=cmd_token)

    au = sub.add_parser("audit", help="read the audit trail, verify its hash chain")
    ausub = au.add_subparsers(dest="action", required=True)
    tail = ausub.add_parser("tail", help="print audit events as JSON lines, oldest first")
    tail.add_argument("--tenant", default="")
    tail.add_argument("--type", default="", help="event type, e.g. token.issued")
    tail.add_argument("--subject", default="")
    tail.add_argument("--since", type=since, default=0,
                      help="Unix seconds, or a duration ago (e.g. 1h, 7d)")
    tail.add_argument("--after", type=int, default=0, help="start after this seq")
    tail.add_argument("--limit", type=int, default=100, help="page size (max 1000)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    av = ausub.add_parser("verify", help="walk the hash chain; exit 1 naming the first bad record")
    av.add_argument("--checkpoints", default="", metavar="FILE",
                    help="also prove the chain extends every signed checkpoint in FILE "
                         "(state_dir/audit/checkpoints.jsonl, one JSON checkpoint a line)")
    av.add_argument("--checkpoint-key", default="", metavar="JWK_FILE",
                    help="the pinned checkpoint public key, a JWK or a JWKS (default: "
                         "state_dir/audit/checkpoint-key.jwk)")
    va = ausub.add_parser("verify-archive", help="offline: check archives that retention "
                          "wrote (state_dir/audit/archive); exit 1 naming the first problem")
    va.add_argument("archives", nargs="+", metavar="FILE", help="audit-*.jsonl.gz, any order")
    va.add_argument("--checkpoint-key", default="", metavar="JWK_FILE",
                    help="the pinned checkpoint public key (default: "
                         "state_dir/audit/checkpoint-key.jwk)")
    au.set_defaults(func=cmd_audit)

    hs = sub.add_parser("hash-secret", help="make an introspection_clients entry")
    hs.add_argument("client_id")
    hs.add_argument("--stdin", action="store_true", help="read the secret from stdin "
                    "instead of generating one")
    hs.set_defaults(func=cmd_hash_secret)

    cl = sub.add_parser("callers", help="grant, list or revoke caller roles (SPIFFE IDs)")
    csub = cl.add_subparsers(dest="action", required=True)
    csub.add_parser("list")
    g = csub.add_parser("grant")
    g.add_argument("identity", help="SPIFFE ID, e.g. spiffe://example.org/ns/pay/sa/api")
    g.add_argument("--role", required=True,
                   choices=["admin", "issuer", "verifier", "revoker", "auditor"])
    g.add_argument("--tenant", action="append", help="limit to this tenant (repeatable)")
    g.add_argument("--audience", action="append", help="issuer: allowed audience (repeatable)")
    g.add_argument("--max-lifetime", type=duration, default=0,
                   help="issuer: longest token lifetime, e.g. 900, 15m, 1h")
    rv = csub.add_parser("revoke")
    rv.add_argument("identity")
    rv.add_argument("--role", default="", help="one role (default: every role)")
    cl.set_defaults(func=cmd_callers)

    add_trust_commands(sub, connect=_client, emit=_emit, duration=duration)
    register_compliance(sub, connect=_client, emit=_emit, keys=ksub)
    from fedtoken.cli.doctor import add_doctor_command

    add_doctor_command(sub, serve_options=_serve_options, overrides=serve_overrides)

    dc = sub.add_parser("dev-cert", help="issue a client certificate from the dev CA")
    dc.add_argument("identity", help="SPIFFE ID for the certificate's URI SAN")
    dc.add_argument("--out", required=True, help="directory for client.pem, client.key, ca.pem")
    dc.add_argument("--days", type=int, default=90)
    dc.set_defaults(func=cmd_dev_cert)

    j = sub.add_parser("jwks", help="print a tenant's JWKS")
    j.add_argument("--tenant", default="")
    j.set_defaults(func=cmd_jwks)
    _json_everywhere(p)
    return p


def _json_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--json`` after any command too (``fedtoken keys list --json``), not
    only before it; commands that had their own keep it."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not children:
        if parser.prog.split()[1:2] != ["serve"] and not any(
                "--json" in a.option_strings for a in parser._actions):
            parser.add_argument("--json", action="store_true",
                                help="print JSON even on a terminal")
        return
    for child in children:
        for sub_parser in set(child.choices.values()):
            _json_everywhere(sub_parser)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)  # usage errors: argparse exits 2
    out = output.configure(output.Output.detect(
        json_flag=bool(ns.global_json or getattr(ns, "json", False))))
    if ns.command in ("compliance", "keys") and out.json:
        ns.json = True  # their own table, or the report as JSON like every command
    try:
        code: int = ns.func(ns)
        return code
    except FedtokenRpcError as exc:
        out.error(errors.rpc_error(exc, ns.target, getattr(ns, "tls_files", "")))
    except UsageError as exc:
        out.error(str(exc))
    except FedtokenError as exc:
        out.error(f"{exc.reason.value}: {exc.message}")
    except json.JSONDecodeError as exc:
        out.error(f"not JSON: {exc}")
    except PermissionError as exc:
        out.error(f"permission denied: {exc.filename}: run as a user that may read it")
    except FileNotFoundError as exc:
        out.error(f"no such file: {exc.filename}")
    except OSError as exc:
        out.error(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a stack trace
        out.error(f"unexpected {type(exc).__name__}: {exc} (please report this)")
    return 2


if __name__ == "__main__":
    sys.exit(main())

