"""``fedtoken doctor``: is this machine's fedtoken configuration healthy?

Reads the settings exactly as ``serve`` does (same flags, environment and
file), then checks, one row each, with the fix for every failure:

* config: the settings load and validate;
* hsm: the PKCS#11 module loads, the token opens, the configured PIN logs in,
  and every fedtoken private key object is sensitive and non-extractable
  since generation and sign-only (``core.compliance.weak_attributes``);
* postgres: reachable within a timeout; migrations: the schema is at this
  build's version; clock: this machine's clock against Postgres's now();
* certificates: the gRPC server certificate, the client CA and the operator
  certificate are inside their validity window (a warning within 14 days of
  the end), chain to the CA, and carry the SPIFFE ID they should.

Nothing is created or changed: no dev token, no dev PKI, no embedded
Postgres is started, no migration applied. Against a running server the
only effect is one more login session on the token (its own process, so its
own PKCS#11 library state) and one Postgres connection.
Exit 0 when nothing fails (warnings allowed), 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedtoken.cli import output

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
PG_TIMEOUT_SECONDS = 5.0
MAX_SKEW_SECONDS = 5.0
EXPIRY_WARNING = dt.timedelta(days=14)
COLUMNS: output.Columns = [("CHECK", "name"), ("STATUS", "status"), ("DETAIL", "detail"),
                           ("FIX", "fix")]


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, FAIL, detail, fix)


# --- settings -----------------------------------------------------------------------------


def check_settings(overrides: dict[str, Any], config_file: Path | None
                   ) -> tuple[Check, Any]:
    from fedtoken.config import load_settings
    from fedtoken.core.errors import FedtokenError

    try:
        settings = load_settings(overrides, config_file=config_file)
    except FedtokenError as exc:
        return _fail("config", exc.message, "fix the setting named (flag, FEDTOKEN_* variable "
                     "or TOML file); README lists every setting"), None
    except (OSError, ValueError) as exc:
        return _fail("config", f"cannot read the settings: {exc}",
                     "check --config / FEDTOKEN_CONFIG names a readable TOML file"), None
    where = f" from {config_file}" if config_file else ""
    return Check("config", PASS, f"settings load and validate{where}"), settings


# --- HSM ----------------------------------------------------------------------------------


def _hsm_config(settings: Any) -> Any:
    """The module, token and PIN ``serve`` would use, without creating the dev
    token (doctor changes nothing)."""
    from fedtoken.hsm import HsmConfig, find_softhsm_module

    module = settings.hsm_module or find_softhsm_module()
    if not module:
        raise LookupError("no PKCS#11 module configured and SoftHSM2 not found")
    pin_configured = settings.hsm_pin or settings.hsm_pin_file
    if settings.hsm_init_dev_token and not pin_configured and "softhsm" in module:
        softhsm = settings.state_dir.resolve() / "softhsm"
        if not (softhsm / "pin").is_file():
            raise FileNotFoundError(
                f"the dev token under {softhsm} does not exist yet (`fedtoken serve` creates "
                "it), and no hsm_pin / hsm_pin_file is configured")
        # As serve does (fedtoken.app.prepare_hsm): SoftHSM reads it on load.
        os.environ.setdefault("SOFTHSM2_CONF", str(softhsm / "softhsm2.conf"))
        pin = (softhsm / "pin").read_text(encoding="ascii").strip()
    else:
        pin = settings.resolve_pin()
    return HsmConfig(module=module, token_label=settings.hsm_token_label, pin=pin,
                     key_size=settings.key_size)


def check_hsm(settings: Any) -> list[Check]:
    from fedtoken.core.compliance import weak_attributes
    from fedtoken.core.errors import FedtokenError

    try:
        config = _hsm_config(settings)
    except LookupError as exc:
        return [_fail("hsm module", str(exc), "install softhsm2 or set hsm_module "
                      "(FEDTOKEN_HSM_MODULE) to the PKCS#11 library of your HSM")]
    except (OSError, FedtokenError) as exc:
        detail = exc.message if isinstance(exc, FedtokenError) else str(exc)
        return [_fail("hsm pin", detail, "set hsm_pin_file (FEDTOKEN_HSM_PIN_FILE) or "
                      "FEDTOKEN_HSM_PIN, or run `fedtoken serve` once for the dev token")]
    if not Path(config.module).is_file():
        return [_fail("hsm module", f"{config.module}: no such file",
                      "set hsm_module (FEDTOKEN_HSM_MODULE) to the PKCS#11 library's path")]
    checks = [Check("hsm module", PASS, config.module)]
    from fedtoken.hsm import Pkcs11Hsm

    hsm = Pkcs11Hsm(config)
    try:
        # One thread only (this one): every call below holds the process's
        # PKCS#11 lock, like the server's own.
        labels = hsm.all_key_labels()
        checks.append(Check("hsm login", PASS,
                            f"token {config.token_label!r}: logged in, {len(labels)} fedtoken "
                            "key object(s)"))
        weak: list[str] = []
        private = 0
        for label in labels:
            attrs = hsm.read_key_attributes(label)
            if not attrs.present:
                continue  # a public half whose private half is gone (retired)
            private += 1
            wrong = weak_attributes(attrs)
            if wrong:
                weak.append(f"{label}: {', '.join(wrong)}")
        if weak:
            checks.append(_fail("hsm keys", "; ".join(weak),
                                "these private keys are not protected: rotate the tenant "
                                "(`fedtoken keys rotate --now`) and destroy them "
                                "(`fedtoken keys reconcile --fix`); check the HSM policy"))
        else:
            checks.append(Check("hsm keys", PASS, f"{private} private key(s), all sensitive, "
                                "non-extractable since generation, sign-only"))
    except FedtokenError as exc:
        bad_pin = "PIN" in exc.message or "login" in exc.message
        checks.append(_fail(
            "hsm login", exc.message,
            "check hsm_pin / hsm_pin_file is this token's user PIN (not the SO PIN) and is "
            "not locked" if bad_pin else
            "check hsm_token_label (FEDTOKEN_HSM_TOKEN_LABEL), the module's own configuration "
            "(SOFTHSM2_CONF for SoftHSM) and that the HSM is reachable"))
    finally:
        hsm.close()
    return checks


# --- Postgres -----------------------------------------------------------------------------


def _dsn(settings: Any) -> str:
    if settings.database_dsn:
        return str(settings.database_dsn)
    from fedtoken.store.embedded import EmbeddedPostgres, EmbeddedPostgresError

    pg = EmbeddedPostgres(settings.state_dir.resolve() / "pg")
    try:
        return pg.app_dsn
    except EmbeddedPostgresError:
        raise LookupError(f"no database_dsn, and the embedded Postgres under {pg.data_dir} "
                          "was never started") from None


async def _postgres(dsn: str) -> tuple[list[int], float, float]:
    """Applied migration versions, the server's now() (Unix seconds) and the
    local time halfway through that query."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=PG_TIMEOUT_SECONDS)
    try:
        if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
            versions: list[int] = []
        else:
            versions = [r["version"] for r in
                        await conn.fetch("SELECT version FROM schema_migrations",
                                         timeout=PG_TIMEOUT_SECONDS)]
        before = time.time()
        now = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8",
                                  timeout=PG_TIMEOUT_SECONDS)
        after = time.time()
        return versions, float(now), (before + after) / 2
    finally:
        await conn.close()


def check_postgres(settings: Any) -> list[Check]:
    from fedtoken.store.migrate import load_migrations

    names = ("postgres", "migrations", "clock")
    try:
        dsn = _dsn(settings)
    except LookupError as exc:
        return [_fail("postgres", str(exc), "start `fedtoken serve` (it starts the embedded "
                      "Postgres) or set database_dsn (--dsn, FEDTOKEN_DATABASE_DSN)"),
                *(Check(n, SKIP, "Postgres not reachable") for n in names[1:])]
    where = _where(dsn)
    try:
        versions, pg_now, local_now = asyncio.run(
            asyncio.wait_for(_postgres(dsn), PG_TIMEOUT_SECONDS * 2))
    except (OSError, TimeoutError) as exc:
        return [_fail("postgres", f"{where}: not reachable ({type(exc).__name__}: {exc})",
                      "check that Postgres runs and listens there, and database_dsn "
                      "(--dsn, FEDTOKEN_DATABASE_DSN)"),
                *(Check(n, SKIP, "Postgres not reachable") for n in names[1:])]
    except Exception as exc:  # noqa: BLE001 - asyncpg's auth/permission errors, one line
        return [_fail("postgres", f"{where}: {type(exc).__name__}: {exc}",
                      "check the role, password (or passfile) and database in database_dsn"),
                *(Check(n, SKIP, "Postgres not usable") for n in names[1:])]
    checks = [Check("postgres", PASS, f"{where}: connected")]
    shipped = {m.version for m in load_migrations()}
    missing = sorted(shipped - set(versions))
    unknown = sorted(set(versions) - shipped)
    if missing:
        checks.append(_fail("migrations", f"not applied: {missing}",
                            "start `fedtoken serve` once (it migrates as the schema owner, "
                            "database_migration_dsn), then check again"))
    elif unknown:
        checks.append(_fail("migrations", f"the database has migrations this build does not "
                            f"know: {unknown}", "upgrade fedtoken to the release that "
                            "migrated this database"))
    else:
        checks.append(Check("migrations", PASS, f"current (version {max(shipped)})"))
    skew = local_now - pg_now
    detail = f"this machine is {abs(skew):.2f} s {'ahead of' if skew >= 0 else 'behind'} Postgres"
    if abs(skew) > MAX_SKEW_SECONDS:
        checks.append(_fail("clock", detail, "synchronise both clocks (NTP / chrony): tokens' "
                            "iat/exp and revocation cuts compare times across machines"))
    else:
        checks.append(Check("clock", PASS, detail))
    return checks


def _where(dsn: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}/{parts.path.lstrip('/')}"


# --- certificates -------------------------------------------------------------------------


def _certificate_files(settings: Any, client_cert: str) -> Iterator[tuple[str, Path, str]]:
    """(check name, file, the setting that names it) of every certificate."""
    tls_dir = settings.state_dir.resolve() / "tls"
    if settings.tls_cert:
        yield "server certificate", Path(settings.tls_cert), "tls_cert"
        yield "client CA", Path(settings.tls_client_ca), "tls_client_ca"
    elif settings.dev_pki:
        yield "server certificate", tls_dir / "server.pem", "the dev PKI"
        yield "client CA", tls_dir / "ca.pem", "the dev PKI"
    if client_cert:
        yield "operator certificate", Path(client_cert), "--tls-cert"
    elif (tls_dir / "operator.pem").exists():
        yield "operator certificate", tls_dir / "operator.pem", "the dev PKI"


def check_certificates(settings: Any, *, client_cert: str = "", client_ca: str = "",
                       now: dt.datetime | None = None) -> list[Check]:
    from cryptography import x509

    if settings.insecure:
        return [Check("certificates", WARN, "insecure: gRPC is plaintext and unauthenticated",
                      "never outside a test: configure tls_cert, tls_key and tls_client_ca")]
    now = now or dt.datetime.now(dt.UTC)
    loaded: dict[str, x509.Certificate] = {}
    checks: list[Check] = []
    files = list(_certificate_files(settings, client_cert))
    if not files:
        return [_fail("certificates", "no TLS certificate configured and dev_pki off",
                      "set tls_cert, tls_key and tls_client_ca")]
    for name, path, source in files:
        if not path.is_file():
            fix = ("`fedtoken serve` creates it" if "dev PKI" in source
                   else f"point {source} at the PEM file")
            checks.append(_fail(name, f"{path}: no such file (from {source})", fix))
            continue
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            checks.append(_fail(name, f"{path}: not a PEM certificate", f"check {source}"))
            continue
        loaded[name] = cert
        checks.append(_certificate_check(name, path, source, cert, now))
    ca_path = Path(client_ca) if client_ca else None
    ca = (x509.load_pem_x509_certificate(ca_path.read_bytes())
          if ca_path and ca_path.is_file() else loaded.get("client CA"))
    operator = loaded.get("operator certificate")
    if ca is not None and operator is not None:
        try:
            operator.verify_directly_issued_by(ca)
        except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature et al.
            checks.append(_fail("operator chain", "the operator certificate is not issued by "
                                "the client CA", "issue it from the CA in tls_client_ca "
                                "(dev: `fedtoken dev-cert`), or give the right --tls-cert"))
    return checks


def _certificate_check(name: str, path: Path, source: str, cert: Any,
                       now: dt.datetime) -> Check:
    from cryptography import x509

    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        uris, dns, ips = [], [], []
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    renew = ("renew it (dev PKI: delete it and restart `fedtoken serve`)" if "dev PKI" in source
             else f"renew it and replace the file {source} names (picked up without a "
                  "restart)")
    if end < now:
        return _fail(name, f"{path}: expired on {end:%Y-%m-%d %H:%M} UTC", renew)
    if start > now:
        return _fail(name, f"{path}: not valid before {start:%Y-%m-%d %H:%M} UTC",
                     "check this machine's clock, or reissue the certificate")
    if name == "operator certificate":
        if len(uris) != 1 or len(spiffe) != 1:
            return _fail(name, f"{path}: needs exactly one URI SAN, a SPIFFE ID (found "
                         f"{len(uris)} URIs)", "reissue it with one spiffe:// URI SAN")
        who = f"SPIFFE ID {spiffe[0]}"
    else:
        who = (f"SPIFFE ID {spiffe[0]}" if spiffe else
               "names " + (", ".join([*dns, *ips]) or "none"))
    detail = f"{path}: {who}, valid until {end:%Y-%m-%d} ({(end - now).days} d)"
    if end - now < EXPIRY_WARNING:
        return Check(name, WARN, f"{detail}: expires soon", renew)
    return Check(name, PASS, detail)


# --- the command --------------------------------------------------------------------------


def run_checks(overrides: dict[str, Any], config_file: Path | None, *,
               client_cert: str = "", client_ca: str = "") -> list[Check]:
    first, settings = check_settings(overrides, config_file)
    if settings is None:
        return [first, *(Check(n, SKIP, "settings do not load")
                         for n in ("hsm", "postgres", "certificates"))]
    return [first, *_guarded("hsm", lambda: check_hsm(settings)),
            *_guarded("postgres", lambda: check_postgres(settings)),
            *_guarded("certificates", lambda: check_certificates(
                settings, client_cert=client_cert, client_ca=client_ca))]


def _guarded(name: str, checks: Callable[[], list[Check]]) -> list[Check]:
    """A group's checks; anything unforeseen is that group's failure, one row,
    not a stack trace that hides the other groups' results."""
    try:
        return checks()
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        return [_fail(name, f"{type(exc).__name__}: {exc}",
                      "see the detail; the other checks ran regardless")]


def report(checks: list[Check]) -> dict[str, Any]:
    """The JSON form: ``{"ok": bool, "checks": [{name, status, detail, fix}]}``."""
    return {"ok": not any(c.status == FAIL for c in checks),
            "checks": [asdict(c) for c in checks]}


def run(ns: argparse.Namespace, *, overrides: Callable[[argparse.Namespace], dict[str, Any]]
        ) -> int:
    out = output.current()
    with out.progress("checking configuration, HSM, Postgres and certificates"):
        checks = run_checks(overrides(ns), ns.config, client_cert=ns.tls_cert,
                            client_ca=ns.tls_ca)
    result = report(checks)
    failed = [c.name for c in checks if c.status == FAIL]
    if out.json:
        out.emit(result)
    else:
        out.emit(result["checks"], COLUMNS,
                 title="all checks pass" if result["ok"] else f"FAILED: {', '.join(failed)}")
    return 0 if result["ok"] else 1


def add_doctor_command(sub: Any, *, serve_options: Callable[[argparse.ArgumentParser], None],
                       overrides: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
    d = sub.add_parser("doctor", help="check the configuration, HSM, Postgres, clock and "
                       "certificates; a pass/fail table with the fix for each failure")
    serve_options(d)
    d.set_defaults(func=functools.partial(run, overrides=overrides))
