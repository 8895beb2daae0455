"""Fetching a trusted issuer's discovery document and JWKS over HTTP(S).

Everything a remote server controls is bounded here, before the cache sees
it: the URL (only configured or discovered ones, https only, http for
loopback in tests), the time (one deadline per request, covering connect,
headers and body), the size (streamed, cut off at the cap, never buffered
whole), the encoding (identity only, so no decompression bomb), redirects
(never followed: a 3xx is an error, since following one would fetch a URL
nobody configured), and what we say about a failure (our own words, never
the response's reason phrase, headers or body).

Outcomes come back as ``HttpDocument`` or ``FetchFailed`` carrying a
``FetchOutcome``: ERROR when the server did not give us a document (network,
timeout, status, redirect), REJECTED when it gave us one we refuse.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Final

import aiohttp

from fedtoken.core.errors import InvalidRequest
from fedtoken.core.jose import loads_strict
from fedtoken.core.trust import FetchOutcome, check_trust_url
from fedtoken.federation.freshness import CacheDirectives, parse_cache_control

__all__ = [
    "DISCOVERY_PATH",
    "FetchFailed",
    "HttpDocument",
    "JwksFetcher",
    "check_url",
    "discovery_url",
    "parse_discovery",
    "tls_context",
]

DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
# An ETag longer than this is not kept (nor sent back): real ones are a hash.
MAX_ETAG_LENGTH: Final = 256
# Bytes per read from the response stream; the cap is checked after each.
_CHUNK: Final = 16384
_ACCEPT: Final = "application/jwk-set+json, application/json;q=0.9"


class FetchFailed(Exception):
    """A fetch that produced no usable document; ``detail`` is our own text
    (safe to log, audit and show an operator)."""

    def __init__(self, outcome: FetchOutcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


@dataclass(frozen=True, slots=True)
class HttpDocument:
    """A 200 (body) or a 304 (empty body: the cached one still holds)."""

    status: int
    body: bytes
    etag: str
    directives: CacheDirectives


def check_url(url: str, *, allow_loopback_http: bool, name: str = "jwks_uri") -> str | None:
    """Why ``url`` may not be fetched, or None when it may.

    The one URL rule of trust definitions (``core.trust.check_trust_url``:
    https only, http for a loopback host when ``allow_loopback_http``, no
    credentials, query, fragment or dot segments), applied again at fetch
    time: to a discovered jwks_uri, which no operator checked, and to a
    configured one, in case it reached us without passing through
    validation.
    """
    if not isinstance(url, str):
        return f"{name} must be a string"
    try:
        check_trust_url(url, name, allow_http_loopback=allow_loopback_http)
    except InvalidRequest as exc:
        return exc.message
    return None


def discovery_url(issuer: str) -> str:
    """Where an issuer's OpenID Provider metadata lives (OIDC Discovery 1.0
    section 4: a trailing slash of the issuer is dropped before appending)."""
    return (issuer[:-1] if issuer.endswith("/") else issuer) + DISCOVERY_PATH


def parse_discovery(body: bytes, issuer: str, *, allow_loopback_http: bool) -> str:
    """The ``jwks_uri`` of a discovery document, or FetchFailed(REJECTED).

    The document's ``issuer`` must equal the configured issuer exactly
    (OIDC Discovery section 4.3): a mismatch means the document speaks for
    someone else, and its keys must not speak for this issuer. The jwks_uri
    must pass the same URL rule as a configured one.
    """

    def refuse(detail: str) -> FetchFailed:
        return FetchFailed(FetchOutcome.REJECTED, detail)

    try:
        document = loads_strict(body)
    except ValueError as exc:
        raise refuse("discovery document is not strict JSON") from exc
    if type(document) is not dict:
        raise refuse("discovery document is not a JSON object")
    if document.get("issuer") != issuer:
        raise refuse("discovery document names another issuer (must match exactly)")
    jwks_uri = document.get("jwks_uri")
    if type(jwks_uri) is not str:
        raise refuse("discovery document has no jwks_uri string")
    problem = check_url(jwks_uri, allow_loopback_http=allow_loopback_http)
    if problem is not None:
        raise refuse(f"discovered jwks_uri refused: {problem}")
    return jwks_uri


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Server-authenticating TLS (1.2 or later, hostname checked). A
    ``ca_file`` replaces the system trust store, so a federation can be
    pinned to its own CA; without one the system store is used."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _describe(exc: BaseException) -> str:
    """Our words for a client exception. aiohttp's messages can quote what
    the server sent (a reason phrase, a header line), so only the kind of
    failure and, for network errors, the OS's reason are kept."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", "") or "not trusted"
        return f"TLS certificate refused ({reason}); check ca_file"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response body was broken off"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "invalid HTTP response"
    if isinstance(exc, OSError):
        return f"network error ({exc.strerror or type(exc).__name__})"
    return f"fetch failed ({type(exc).__name__})"


def _etag_of(response: aiohttp.ClientResponse) -> str:
    value = response.headers.get("ETag", "")
    ok = 0 < len(value) <= MAX_ETAG_LENGTH and value.isascii() and value.isprintable()
    return value if ok else ""


class JwksFetcher:
    """One HTTP client session for every issuer's fetches.

    The session keeps no cookies, reads no proxy settings from the
    environment and does not decompress. Its connection pool is unbounded
    because the cache already allows at most one fetch in flight per issuer:
    a shared limit would let one slow issuer queue the others' fetches.
    """

    def __init__(
        self, *, timeout: float, ssl_context: ssl.SSLContext, allow_loopback_http: bool = False
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._timeout = timeout
        self._ssl_context = ssl_context
        self._allow_loopback_http = allow_loopback_http
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Create the session (on the running event loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl_context, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                headers={"User-Agent": "fedtoken-jwks-cache"},
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def discover(self, issuer: str, *, max_bytes: int) -> tuple[str, CacheDirectives]:
        """The issuer's jwks_uri from its discovery document, and the
        document's caching directives (how long the answer may be reused)."""
        document = await self.get(discovery_url(issuer), max_bytes=max_bytes)
        jwks_uri = parse_discovery(
            document.body, issuer, allow_loopback_http=self._allow_loopback_http
        )
        return jwks_uri, document.directives

    async def get(self, url: str, *, max_bytes: int, etag: str = "") -> HttpDocument:
        """GET ``url`` within the deadline and the size cap.

        With ``etag`` the request is conditional (If-None-Match) and a 304
        is a valid answer; without one a 304 is an error. Only 200 and that
        304 are answers: every other status is an ERROR whatever its body
        says (a 500 with a JSON body wiped key stores elsewhere: pyjwt #1162,
        step-ca #2769).
        """
        problem = check_url(url, allow_loopback_http=self._allow_loopback_http, name="URL")
        if problem is not None:
            raise FetchFailed(FetchOutcome.ERROR, f"refused to fetch: {problem}")
        session = self._session
        if session is None:
            raise FetchFailed(FetchOutcome.ERROR, "the JWKS cache is not started")
        headers = {"Accept": _ACCEPT, "Accept-Encoding": "identity"}
        if etag:
            headers["If-None-Match"] = etag
        try:
            # aiohttp's own total timeout covers the same span; this one is
            # the guarantee, whatever aiohttp's version does with body reads.
            async with asyncio.timeout(self._timeout):
                async with session.get(url, headers=headers, allow_redirects=False) as response:
                    return await self._read(response, max_bytes=max_bytes, conditional=bool(etag))
        except FetchFailed:
            raise
        except TimeoutError as exc:
            raise FetchFailed(
                FetchOutcome.ERROR, f"no complete answer within {self._timeout:g} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise FetchFailed(FetchOutcome.ERROR, _describe(exc)) from exc

    async def _read(
        self, response: aiohttp.ClientResponse, *, max_bytes: int, conditional: bool
    ) -> HttpDocument:
        status = response.status
        directives = parse_cache_control(
            ",".join(response.headers.getall("Cache-Control", [])) or None,
            response.headers.get("Age"),
        )
        if status == 304:
            if conditional:
                return HttpDocument(304, b"", _etag_of(response), directives)
            raise FetchFailed(FetchOutcome.ERROR, "HTTP 304 to a request that was not conditional")
        if 300 <= status < 400:
            raise FetchFailed(
                FetchOutcome.ERROR,
                f"HTTP {status}: redirects are not followed; configure the final URL",
            )
        if status != 200:
            raise FetchFailed(FetchOutcome.ERROR, f"HTTP {status}")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchFailed(FetchOutcome.ERROR, "the response is compressed; we asked for none")
        if response.content_length is not None and response.content_length > max_bytes:
            response.close()
            raise FetchFailed(
                FetchOutcome.REJECTED, f"the document is larger than {max_bytes} bytes"
            )
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            body += chunk
            if len(body) > max_bytes:
                # Close instead of draining: the rest is never read.
                response.close()
                raise FetchFailed(
                    FetchOutcome.REJECTED, f"the document is larger than {max_bytes} bytes"
                )
        return HttpDocument(200, bytes(body), _etag_of(response), directives)
