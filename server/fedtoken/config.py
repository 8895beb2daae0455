"""Settings, resolved once at start: arguments > environment > file > defaults.

Nothing else in fedtoken reads the environment (except the PKCS#11 library,
which reads SOFTHSM2_CONF itself). Every setting is documented in the README;
the environment name is ``FEDTOKEN_`` + the upper-case field name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedtoken.core.authz import is_spiffe_id
from fedtoken.core.errors import InvalidRequest
from fedtoken.core.policy import check_key_size

# The client package's receive limit (fedtoken_client.client.MAX_RESPONSE_BYTES;
# tests/e2e/test_hardening_rpc.py keeps the two equal).
MAX_CLIENT_MESSAGE_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Every knob of a fedtoken process. Immutable once resolved."""

    # Where the dev HSM token, the embedded Postgres and spill files live.
    state_dir: Path = Path(".state")
    # gRPC listener. Workers share it through SO_REUSEPORT.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    # mTLS on the gRPC port: the server's certificate chain and key, and the
    # CA bundle that client certificates must chain to (PEM files; replaced
    # files are picked up by new connections without a restart). All empty:
    # with dev_pki, a development CA under state_dir/tls issues them.
    tls_cert: str = ""
    tls_key: str = field(default="", repr=False)
    tls_client_ca: str = ""
    # Create the development CA, server and operator certificates under
    # state_dir/tls when no TLS files are configured.
    dev_pki: bool = True
    # Plaintext gRPC with no caller authentication: refused unless the gRPC
    # listener is loopback, and every call needing a role is then denied.
    insecure: bool = False
    # With insecure only (tests and benchmarks that measure what TLS costs):
    # the identity every plaintext caller is taken to be. Empty: none, so every
    # call that needs a role is denied.
    insecure_identity: str = ""
    # SPIFFE IDs that hold every role for every tenant (the operators), so a
    # fresh deployment can be administered; comma separated. The dev PKI's
    # operator identity is added when the dev PKI is in use.
    bootstrap_admins: str = ""
    # Optional TLS for the HTTP bridge listener (deployments without a
    # terminating proxy): certificate chain and key, PEM.
    http_tls_cert: str = ""
    http_tls_key: str = field(default="", repr=False)
    # HTTP bridge (JWKS, discovery, introspection, /healthz). 0 picks a free
    # port (one worker only); a negative port disables the bridge.
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # HTTP bridge: a request's line and headers, then its body, must each
    # arrive within this many seconds; slower or half-open requests are closed
    # (408 for a body).
    http_read_timeout_seconds: float = 10.0
    # HTTP bridge: idle keep-alive connections are closed after this many
    # seconds (keep it above any reverse proxy's idle timeout).
    http_keepalive_seconds: float = 30.0
    # HTTP bridge: connections one process holds at once; more get 503.
    http_max_connections: int = 1024
    # Operations listener (plain HTTP, keep it private: /metrics for
    # Prometheus, /healthz for probes); a negative port disables it. Workers
    # share it through SO_REUSEPORT, and /metrics sums every worker.
    ops_host: str = "127.0.0.1"
    ops_port: int = 9464
    # Directory of the Prometheus multiprocess files the workers write (wiped
    # at start). Empty: state_dir/metrics.
    metrics_dir: str = ""
    # gRPC server reflection, so grpcurl and similar tools can list and call
    # the services.
    grpc_reflection: bool = True
    # Log lines: "json" (one object per line), "text", or "auto" (text on a
    # terminal, JSON otherwise).
    log_format: str = "auto"
    # Base URL the HTTP bridge is reachable at; the default tenant's issuer
    # is this URL, tenant T's is <public_url>/t/<T>. Empty: derived from http.
    public_url: str = ""
    # Postgres DSN; empty starts an embedded Postgres under state_dir/pg.
    database_dsn: str = ""
    # DSN migrations run with (the schema owner, e.g. fedtoken_owner); empty:
    # the embedded server's superuser, or database_dsn itself.
    database_migration_dsn: str = field(default="", repr=False)
    # Postgres bounds, seconds: one request-path operation (acquire to
    # release; the caller's gRPC deadline shortens it) and one long operation
    # (revocation snapshot stream, audit chain walk, purge).
    db_request_timeout_seconds: float = 2.0
    db_long_timeout_seconds: float = 120.0
    db_pool_min: int = 1
    db_pool_max: int = 10
    # PKCS#11 module and token. Empty module: the usual SoftHSM2 paths.
    hsm_module: str = ""
    hsm_token_label: str = "fedtoken-dev"  # noqa: S105 - a label, not a secret
    # The user PIN: give hsm_pin (environment FEDTOKEN_HSM_PIN) or a file.
    hsm_pin: str = field(default="", repr=False)
    hsm_pin_file: str = ""
    # Create the dev SoftHSM token under state_dir when it is missing.
    hsm_init_dev_token: bool = True
    # The tenant served at / and used when a request names none; created on
    # first start with a first active key.
    default_tenant: str = "default"
    create_default_tenant: bool = True
    key_size: int = 2048
    # Verification.
    leeway_seconds: int = 30
    max_token_bytes: int = 8192
    max_batch: int = 5000
    # Largest gRPC message either way. A VerifyBatch request carries up to
    # max_batch tokens and its response up to max_batch verdicts (each at most
    # two token's worth of claims and ids), so the start refuses settings where
    # max_batch x (2 x max_token_bytes + 1 KiB) exceeds it. At most 128 MiB,
    # the client package's receive limit.
    grpc_max_message_bytes: int = 96 * 1024 * 1024
    verify_threads: int = 2
    # Entries of the verified-token cache (fedtoken.verifier.tokencache): a
    # repeated token skips only its signature check; key state, claims and
    # revocation are judged on every call. 0 turns it off. Per entry about
    # 1.5 kB for a typical 8-claim payload, about 7 kB at most (payloads over
    # 1 kB are never cached); the serve engine and the introspection engine
    # of each worker each have one.
    verified_token_cache_size: int = 8192
    # JWKS Cache-Control max-age, seconds: the upper bound; each tenant's is
    # derived from its rotation schedule (fedtoken.core.rotation), never more.
    jwks_max_age_seconds: int = 300
    # Scheduled key rotation: the shortest rotation period a tenant may have
    # (lower only for tests and demos), and how often the scheduler checks
    # (worker 0 of every serve; one leader at a time acts).
    min_rotation_period_seconds: int = 3600
    rotation_check_seconds: float = 30.0
    # Revocation view: verdicts turn REVOCATION_UNAVAILABLE when the view has
    # not been confirmed current for this long (fail closed).
    revocation_staleness_seconds: float = 5.0
    revocation_heartbeat_seconds: float = 1.0
    revocation_resync_seconds: float = 60.0
    # RFC 7662 introspection over HTTP (POST /introspect): the callers allowed,
    # as "client_id:sha256-hex-of-secret" entries separated by commas (see
    # `fedtoken hash-secret`). Empty: every introspection request gets 401.
    introspection_clients: str = field(default="", repr=False)
    # Signed audit checkpoints (docs/security.md, Audit trail): every this
    # many seconds the audit chain's head is signed with the HSM's checkpoint
    # key and appended to state_dir/audit/checkpoints.jsonl and the log (by
    # worker 0 only). 0 disables them.
    audit_checkpoint_seconds: float = 60.0
    # Federation (docs/federation.md): the remote JWKS cache of trusted issuers.
    # A CA bundle for their https endpoints ("" : the system's).
    federation_ca_file: str = ""
    # Tests and demos only: trust issuers on http://127.0.0.1 / localhost.
    federation_allow_http_loopback: bool = False
    # One HTTP request to an issuer (discovery or JWKS) must finish within this.
    federation_fetch_timeout_seconds: float = 5.0
    # Cache-Control max-age of a trusted JWKS, clamped to [min, max]; default
    # when the issuer sends none.
    federation_default_max_age_seconds: float = 900.0
    federation_min_max_age_seconds: float = 60.0
    federation_max_max_age_seconds: float = 6 * 3600.0
    # Unknown kid: at most one refetch per cooldown per issuer; kids a
    # refetch did not find stay unknown for negative_ttl; every fetch of an
    # issuer spends one of fetch_budget per budget_window.
    federation_kid_miss_cooldown_seconds: float = 30.0
    federation_negative_ttl_seconds: float = 60.0
    federation_fetch_budget: int = 10
    federation_budget_window_seconds: float = 300.0
    # Longest wait between background refreshes after errors.
    federation_error_backoff_max_seconds: float = 300.0
    # How long a Verify or VerifyBatch waits for that one refetch.
    federation_kid_wait_seconds: float = 1.0
    # The least max_stale a trusted issuer may be given (tests and demos only
    # go below a minute).
    federation_min_max_stale_seconds: int = 60
    # Audit retention: rows older than this leave Postgres for an archive
    # file under state_dir/audit/archive (after a checkpoint covers them;
    # docs/security.md, "Audit retention"). 0 keeps every row forever.
    audit_retention_seconds: float = 90 * 86400.0
    # How often the worker that signs checkpoints looks for rows to archive.
    audit_retention_check_seconds: float = 3600.0
    # Worker processes for `serve` (0: one per core).
    workers: int = 0
    log_level: str = "INFO"

    @property
    def http_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.http_tls_cert else "http"
        return f"{scheme}://{self.http_host}:{self.http_port}"

    @property
    def metrics_path(self) -> Path:
        """The Prometheus multiprocess directory: metrics_dir, else state_dir/metrics."""
        if self.metrics_dir:
            return Path(self.metrics_dir)
        return self.state_dir.resolve() / "metrics"

    @property
    def log_level_number(self) -> int:
        """log_level as a logging level (an unknown name is INFO)."""
        level = logging.getLevelNamesMapping().get(self.log_level.strip().upper())
        return logging.INFO if level is None else level

    @property
    def bootstrap_identities(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_admins.split(",") if s.strip()]

    def issuer_for(self, tenant: str) -> str:
        """The issuer URL a new tenant gets unless the operator names one."""
        base = self.http_public_url
        return base if tenant == self.default_tenant else f"{base}/t/{tenant}"

    def resolve_pin(self) -> str:
        if self.hsm_pin:
            return self.hsm_pin
        pin_file = Path(self.hsm_pin_file) if self.hsm_pin_file else None
        if pin_file is None:
            candidate = self.state_dir / "softhsm" / "pin"
            pin_file = candidate if candidate.exists() else None
        if pin_file is None:
            raise InvalidRequest(
                "no HSM PIN configured: set FEDTOKEN_HSM_PIN or hsm_pin_file, or let the "
                f"dev token be created under {self.state_dir}/softhsm"
            )
        return pin_file.read_text().strip()


_FIELDS = {f.name: f for f in fields(Settings)}


def _coerce(name: str, raw: Any) -> Any:
    kind = _FIELDS[name].type
    if isinstance(raw, str):
        text = raw.strip()
        if kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise InvalidRequest(f"setting {name}: expected a boolean, got {raw!r}")
        if kind == "int":
            try:
                return int(text)
            except ValueError as exc:
                raise InvalidRequest(f"setting {name}: expected an integer") from exc
        if kind == "float":
            try:
                return float(text)
            except ValueError as exc:
                raise InvalidRequest(f"setting {name}: expected a number") from exc
        if kind == "Path":
            return Path(text)
        return raw
    if kind == "Path":
        return Path(raw)
    return raw


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Resolve settings: ``overrides`` (CLI) > environment > TOML file > defaults.

    The TOML file is ``config_file``, else ``$FEDTOKEN_CONFIG`` if set. Keys
    are the field names of Settings, at the top level or under [fedtoken].
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or (Path(env["FEDTOKEN_CONFIG"]) if env.get("FEDTOKEN_CONFIG") else None)
    if path is not None:
        data = tomllib.loads(path.read_text())
        data = data.get("fedtoken", data)
        for key, raw in data.items():
            if key not in _FIELDS:
                raise InvalidRequest(f"{path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw)
    for name in _FIELDS:
        env_name = "FEDTOKEN_" + name.upper()
        if env_name in env:
            values[name] = _coerce(name, env[env_name])
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in _FIELDS:
            raise InvalidRequest(f"unknown setting {key!r}")
        values[key] = _coerce(key, raw)
    settings = Settings(**values)
    _validate(settings)
    return settings


def parse_introspection_clients(spec: str) -> dict[str, bytes]:
    """``id:hex,id2:hex`` -> {id: sha256 digest}; refuses malformed entries."""
    clients: dict[str, bytes] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        client_id, _, digest = entry.rpartition(":")
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raw = b""
        if not client_id or len(raw) != 32 or client_id in clients:
            raise InvalidRequest(
                "introspection_clients: each entry is client_id:<64 hex chars of sha256(secret)>,"
                " ids unique"
            )
        clients[client_id] = raw
    return clients


def batch_item_bound(max_token_bytes: int) -> int:
    """Bytes one VerifyBatch item may take, request or response side."""
    return 2 * max_token_bytes + 1024


def _validate(s: Settings) -> None:
    parse_introspection_clients(s.introspection_clients)
    tls_files = (s.tls_cert, s.tls_key, s.tls_client_ca)
    if any(tls_files) and not all(tls_files):
        raise InvalidRequest("give all of tls_cert, tls_key and tls_client_ca, or none")
    if bool(s.http_tls_cert) != bool(s.http_tls_key):
        raise InvalidRequest("give both http_tls_cert and http_tls_key, or neither")
    if s.insecure_identity and not s.insecure:
        raise InvalidRequest("insecure_identity applies only with insecure")
    if s.insecure_identity and not is_spiffe_id(s.insecure_identity):
        raise InvalidRequest("insecure_identity must be a SPIFFE ID")
    for identity in s.bootstrap_identities:
        if not is_spiffe_id(identity):
            raise InvalidRequest("bootstrap_admins: each entry must be a SPIFFE ID "
                                 "(spiffe://trust-domain/path)")
    check_key_size(s.key_size)
    if s.log_format not in ("auto", "text", "json"):
        raise InvalidRequest("log_format must be auto, text or json")
    if s.log_level.strip().upper() not in logging.getLevelNamesMapping():
        raise InvalidRequest("log_level must be a level name: DEBUG, INFO, WARNING or ERROR")
    if not 1 <= s.max_batch <= 100_000:
        raise InvalidRequest("max_batch must be between 1 and 100000")
    if not 1024 <= s.max_token_bytes <= 65536:
        raise InvalidRequest("max_token_bytes must be between 1024 and 65536")
    if not 1024 * 1024 <= s.grpc_max_message_bytes <= MAX_CLIENT_MESSAGE_BYTES:
        raise InvalidRequest(f"grpc_max_message_bytes must be between 1 MiB and "
                             f"{MAX_CLIENT_MESSAGE_BYTES} (the client package's receive limit)")
    largest = s.max_batch * batch_item_bound(s.max_token_bytes)
    if largest > s.grpc_max_message_bytes:
        raise InvalidRequest(
            f"max_batch x (2 x max_token_bytes + 1024) = {largest} bytes exceeds "
            f"grpc_max_message_bytes ({s.grpc_max_message_bytes}): lower max_batch or "
            "max_token_bytes, or raise grpc_max_message_bytes")
    if s.leeway_seconds < 0 or s.leeway_seconds > 300:
        raise InvalidRequest("leeway_seconds must be between 0 and 300")
    if s.revocation_staleness_seconds <= s.revocation_heartbeat_seconds:
        raise InvalidRequest("revocation_staleness_seconds must exceed the heartbeat interval")
    if s.jwks_max_age_seconds < 1:
        raise InvalidRequest("jwks_max_age_seconds must be at least 1")
    if s.min_rotation_period_seconds < 1:
        raise InvalidRequest("min_rotation_period_seconds must be at least 1")
    if not 0 < s.rotation_check_seconds <= 3600:
        raise InvalidRequest("rotation_check_seconds must be above 0 and at most 3600 (the "
                             "scheduler must check well within a rotation period)")
    if s.audit_checkpoint_seconds < 0:
        raise InvalidRequest("audit_checkpoint_seconds must not be negative (0: no checkpoints)")
    for name in ("federation_fetch_timeout_seconds", "federation_default_max_age_seconds",
                 "federation_min_max_age_seconds", "federation_max_max_age_seconds",
                 "federation_kid_miss_cooldown_seconds", "federation_negative_ttl_seconds",
                 "federation_budget_window_seconds", "federation_error_backoff_max_seconds",
                 "federation_kid_wait_seconds"):
        if getattr(s, name) <= 0:
            raise InvalidRequest(f"{name} must be positive")
    if not (s.federation_min_max_age_seconds <= s.federation_default_max_age_seconds
            <= s.federation_max_max_age_seconds):
        raise InvalidRequest("federation max-age: need min <= default <= max")
    if s.federation_fetch_budget < 1 or s.federation_min_max_stale_seconds < 1:
        raise InvalidRequest("federation_fetch_budget and federation_min_max_stale_seconds "
                             "must be at least 1")
    if s.audit_retention_seconds < 0 or s.audit_retention_check_seconds <= 0:
        raise InvalidRequest("audit_retention_seconds must not be negative (0: keep forever) "
                             "and audit_retention_check_seconds must be positive")
    if s.audit_retention_seconds and not s.audit_checkpoint_seconds:
        raise InvalidRequest("audit retention needs signed checkpoints: set "
                             "audit_checkpoint_seconds, or audit_retention_seconds=0")


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy with some fields changed (used by tests and worker spawning)."""
    new = dataclasses.replace(settings, **changes)
    _validate(new)
    return new
