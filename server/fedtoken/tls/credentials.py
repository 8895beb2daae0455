"""gRPC TLS credentials from files, reloaded when the files change.

The server uses gRPC's dynamic credentials: on every new handshake gRPC asks
``ServerTls.fetch`` for a configuration, which re-reads the certificate, key
and client CA bundle only when one of the files changed (mtime, size), so an
operator or an agent such as SPIRE's can replace them without a restart.
Established connections keep the configuration they were made with.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass
class ServerTls:
    """Certificate, key and client CA files of the gRPC listener."""

    cert: Path
    key: Path
    client_ca: Path
    _stamp: tuple[tuple[int, int], ...] = field(default=(), init=False)
    reloads: int = field(default=0, init=False)

    def _config(self) -> grpc.ServerCertificateConfiguration:
        pair = (self.key.read_bytes(), self.cert.read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], self.client_ca.read_bytes())

    def initial(self) -> grpc.ServerCertificateConfiguration:
        self._stamp = _stamp((self.cert, self.key, self.client_ca))
        return self._config()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None: keep the current configuration (gRPC's contract)."""
        try:
            stamp = _stamp((self.cert, self.key, self.client_ca))
            if stamp == self._stamp:
                return None
            config = self._config()
        except (OSError, ValueError) as exc:
            # A half-written replacement must not break new handshakes.
            log.warning("TLS files unreadable (%s); keeping the current certificate",
                        type(exc).__name__)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate files changed; new handshakes use the new certificate")
        return config


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """mTLS: every client must present a certificate chaining to client_ca."""
    return grpc.dynamic_ssl_server_credentials(tls.initial(), tls.fetch,
                                               require_client_authentication=True)


def channel_credentials(ca: Path, cert: Path | None = None,
                        key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
