"""The caller's identity: the one SPIFFE ID in its verified client certificate.

gRPC has already verified the chain against the client CA bundle during the
handshake; here the leaf certificate (``x509_pem_cert`` in the auth context)
is parsed and must carry exactly one URI SAN, a syntactically valid
``spiffe://`` ID. Anything else is UNAUTHENTICATED. Parsed results are cached
per certificate (keyed by its exact PEM bytes; the result depends on nothing
else), so the cost per call is a dict lookup. The bound evicts the oldest
entry (FIFO: no reordering on the per-call path).
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedtoken.core.authz import is_spiffe_id
from fedtoken.core.errors import Unauthenticated

_CACHE_SIZE = 4096
_cache: dict[bytes, str | Unauthenticated] = {}


def _parse(pem: bytes) -> str:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise Unauthenticated("the client certificate cannot be parsed") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise Unauthenticated("the client certificate has no URI SAN with a SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(uris) != 1 or len(spiffe) != 1:
        raise Unauthenticated(
            f"the client certificate must carry exactly one URI SAN, a SPIFFE ID (found "
            f"{len(uris)} URIs, {len(spiffe)} SPIFFE IDs)")
    if not is_spiffe_id(spiffe[0]):
        raise Unauthenticated("the client certificate's SPIFFE ID is malformed")
    return spiffe[0]


def spiffe_id_of_der(der: bytes | None) -> str:
    """The SPIFFE ID of a client certificate the TLS layer verified (the
    HTTP bridge's ``getpeercert(binary_form=True)``); Unauthenticated when
    there is none."""
    if not der:
        raise Unauthenticated("no client certificate: connect with mTLS")
    try:
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    except ValueError as exc:
        raise Unauthenticated("the client certificate cannot be parsed") from exc
    return spiffe_id_of({"x509_pem_cert": [pem]})


def spiffe_id_of(auth_context: dict[str, Any]) -> str:
    """The caller's SPIFFE ID; Unauthenticated when there is none to trust."""
    pems: Any = auth_context.get("x509_pem_cert") or ()
    if not isinstance(pems, list | tuple):
        pems = list(pems)
    if len(pems) != 1 or not isinstance(pems[0], bytes):
        raise Unauthenticated("no client certificate: connect with mTLS")
    pem: bytes = pems[0]
    found = _cache.get(pem)
    if found is None:
        try:
            found = _parse(pem)
        except Unauthenticated as exc:
            found = exc
        if len(_cache) >= _CACHE_SIZE:
            del _cache[next(iter(_cache))]
        _cache[pem] = found
    if type(found) is str:
        return found
    assert isinstance(found, Unauthenticated)
    raise Unauthenticated(found.message)
