"""One line for every way a command can fail, saying what to check next.

A refusal from the server keeps its status and stable reason first
(``NOT_FOUND ISSUER_NOT_TRUSTED: ...``) so scripts can grep for it; the
failures that never reached the service (unreachable, TLS handshake,
deadline) say which target, which certificate flag, or which role.
All of them exit 2 (``cli.main``)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import grpc

from fedtoken_client import FedtokenRpcError

_ROLE = re.compile(r"\brole (\w+)")
_TLS_WORDS = ("ssl", "tls", "handshake", "certificate", "x509")


def rpc_error(exc: FedtokenRpcError, target: str, tls_files: str = "") -> str:
    """The line for a failed call to ``target`` (``tls_files``: which CA and
    client certificate were used, named in a handshake failure)."""
    message = exc.message.strip()
    from_service = exc.reason != "ERROR_REASON_UNSPECIFIED"
    if from_service:
        line = f"{exc.code.name} {exc.reason}: {message}"
        if exc.code == grpc.StatusCode.PERMISSION_DENIED:
            role = _ROLE.search(message)
            if role:
                line = f"{exc.code.name} {exc.reason}: missing role {role.group(1)}: {message}"
        if exc.request_id and exc.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            line += f" (request id {exc.request_id}: search the server log)"
        return line
    lowered = message.lower()
    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) and any(
            w in lowered for w in _TLS_WORDS):
        used = f" with {tls_files}" if tls_files else ""
        return (f"UNAVAILABLE: TLS handshake with {target}{used} failed ({_short(message)}): "
                "check that --tls-ca is the CA of the server's certificate, that "
                "--tls-cert/--tls-key are a client certificate its CA trusts and not expired, and "
                "--tls-server-name if you dial an address the certificate does not name")
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        return (f"UNAVAILABLE: cannot reach a fedtoken server at {target} ({_short(message)}): "
                "is `fedtoken serve` running there? check --target (or FEDTOKEN_TARGET)")
    if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"DEADLINE_EXCEEDED: {target} did not answer in time: is the server "
                "overloaded or the address behind a firewall? check --target")
    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"UNAUTHENTICATED: {message}: give a client certificate with one SPIFFE ID "
                "(--tls-cert/--tls-key, or FEDTOKEN_TLS_CERT/KEY)")
    if exc.code == grpc.StatusCode.PERMISSION_DENIED:
        return f"PERMISSION_DENIED: {message}: ask an admin for the role (`fedtoken callers grant`)"
    return f"{exc.code.name} {exc.reason}: {message}"


def _short(message: str) -> str:
    # gRPC's connection errors are long and repeat themselves; keep the gist.
    one = " ".join(message.split())
    return one if len(one) <= 160 else one[:157] + "..."


def check_client_files(ca: str | Path, cert: str | Path, key: str | Path,
                       now: dt.datetime | None = None) -> str | None:
    """What is wrong with the client's TLS files before any connection is
    tried: a missing file, a certificate that is not PEM, or one outside its
    validity window; None when they look usable."""
    from cryptography import x509

    for flag, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            return (f"{flag} {path}: no such file: give the right path (or the FEDTOKEN_TLS_* "
                    "variables), or run `fedtoken serve` once for the dev certificates")
    now = now or dt.datetime.now(dt.UTC)
    for flag, path in (("--tls-cert", cert), ("--tls-ca", ca)):
        try:
            certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
        except ValueError:
            return f"{flag} {path}: not a PEM certificate"
        if certificate.not_valid_after_utc < now:
            return (f"{flag} {path}: certificate expired on "
                    f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: renew it (dev: "
                    "`fedtoken dev-cert`) or give a valid one")
        if certificate.not_valid_before_utc > now:
            return (f"{flag} {path}: certificate not valid before "
                    f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this "
                    "machine's clock")
    return None
