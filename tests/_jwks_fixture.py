"""A real HTTP server on 127.0.0.1 (random port) that plays a federated
issuer: good and hostile JWKS and discovery documents, configurable per
path at runtime, counting every request per path.

Also the keys to put in those documents, and an in-memory ``KeySetStore``.

    server = await JwksServer().start()
    server.serve_jwks("/jwks", [jwk])             # 200, ETag, Cache-Control
    server.set("/jwks", Reply(status=500, body=b'{"keys": []}'))
    server.counts["/jwks"]                        # requests seen
    await server.stop()
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from fedtoken.core.jwk import int_to_b64url, rsa_public_jwk
from fedtoken.core.jwks import etag as strong_etag
from fedtoken.core.trust import StoredKeySet

__all__ = [
    "JwksServer",
    "MemoryKeySets",
    "Reply",
    "jwk_of",
    "jwks_body",
    "rsa_key",
]


# --- keys -------------------------------------------------------------------------


@cache
def rsa_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """A test RSA key, made once per (name, bits) per process."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def jwk_of(key: rsa.RSAPrivateKey, *, kid: str | None = None, alg: str | None = "RS256",
           private: bool = False, **members: Any) -> dict[str, Any]:
    """The public JWK of ``key`` (kid: its thumbprint unless given; no
    ``alg`` member when alg is None; the private members when ``private``)."""
    numbers = key.private_numbers()
    public = numbers.public_numbers
    jwk = rsa_public_jwk(public.n, public.e, alg=alg or "RS256")
    if alg is None:
        del jwk["alg"]
    if kid is not None:
        jwk["kid"] = kid
    if private:
        jwk.update(d=int_to_b64url(numbers.d), p=int_to_b64url(numbers.p),
                   q=int_to_b64url(numbers.q))
    jwk.update(members)
    return jwk


def jwks_body(keys: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


# --- the server -------------------------------------------------------------------


@dataclass
class Reply:
    """How the server answers one path.

    ``delay``: seconds before anything is sent. ``stream``: after ``body``,
    this many filler bytes, chunked (no Content-Length), ``stream_delay``
    seconds apart per chunk. With an ``ETag`` header and ``honour_etag``, a
    matching If-None-Match gets a 304.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    stream: int = 0
    stream_chunk: int = 65536
    stream_delay: float = 0.0
    honour_etag: bool = True


class JwksServer:
    """The fake issuer. Runs on the test's event loop."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.routes: dict[str, Reply] = {}
        self.counts: Counter[str] = Counter()
        self.if_none_match: list[tuple[str, str]] = []  # (path, header) of each request
        self.stream_sent: dict[str, int] = {}  # bytes of filler written, per path
        self.stream_done: dict[str, asyncio.Event] = {}

    @property
    def base(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    async def start(self) -> JwksServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that gives up (timeout, size cap)
        # ends the handler, so a slow reply does not outlive its test.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- configuring replies ------------------------------------------------------

    def set(self, path: str, reply: Reply) -> Reply:
        self.routes[path] = reply
        return reply

    def serve_jwks(self, path: str, keys: Sequence[dict[str, Any]], *,
                   max_age: int | None = 300, etag: bool = True,
                   headers: dict[str, str] | None = None) -> Reply:
        body = jwks_body(keys)
        h = {"Content-Type": "application/jwk-set+json"}
        if max_age is not None:
            h["Cache-Control"] = f"public, max-age={max_age}"
        if etag:
            h["ETag"] = strong_etag(body)
        h.update(headers or {})
        return self.set(path, Reply(body=body, headers=h))

    def serve_discovery(self, issuer: str, jwks_uri: str, *, max_age: int | None = 300,
                        path: str = "/.well-known/openid-configuration",
                        **members: Any) -> Reply:
        document = {"issuer": issuer, "jwks_uri": jwks_uri, **members}
        h = {"Content-Type": "application/json"}
        if max_age is not None:
            h["Cache-Control"] = f"max-age={max_age}"
        return self.set(path, Reply(body=json.dumps(document).encode(), headers=h))

    def reset_counts(self) -> None:
        self.counts.clear()
        self.if_none_match.clear()

    # --- answering ----------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.counts[path] += 1
        self.if_none_match.append((path, request.headers.get("If-None-Match", "")))
        reply = self.routes.get(path)
        if reply is None:
            return web.Response(status=404, text="no such document")
        if reply.delay:
            await asyncio.sleep(reply.delay)
        etag = reply.headers.get("ETag")
        if reply.honour_etag and etag and request.headers.get("If-None-Match") == etag:
            kept = {k: v for k, v in reply.headers.items() if k in ("ETag", "Cache-Control")}
            return web.Response(status=304, headers=kept)
        if not reply.stream:
            return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        return await self._stream(request, path, reply)

    async def _stream(self, request: web.Request, path: str,
                      reply: Reply) -> web.StreamResponse:
        done = self.stream_done.setdefault(path, asyncio.Event())
        done.clear()
        self.stream_sent[path] = 0
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if reply.body:
                await response.write(reply.body)
            filler = b" " * reply.stream_chunk
            while self.stream_sent[path] < reply.stream:
                if reply.stream_delay:
                    await asyncio.sleep(reply.stream_delay)
                await response.write(filler)
                self.stream_sent[path] += len(filler)
            await response.write_eof()
        except ConnectionError:
            pass  # the client hung up: what the size-cap tests want to see
        finally:
            done.set()
        return response


# --- persistence ------------------------------------------------------------------


class MemoryKeySets:
    """A ``KeySetStore`` in memory; ``fail`` makes every call raise."""

    def __init__(self, sets: Sequence[StoredKeySet] = ()) -> None:
        self.sets: dict[str, StoredKeySet] = {s.issuer: s for s in sets}
        self.saves: list[StoredKeySet] = []
        self.fail = False

    async def load_key_sets(self) -> list[StoredKeySet]:
        if self.fail:
            raise ConnectionError("store down (test)")
        return list(self.sets.values())

    async def save_key_set(self, key_set: StoredKeySet) -> None:
        if self.fail:
            raise ConnectionError("store down (test)")
        self.saves.append(key_set)
        self.sets[key_set.issuer] = key_set
