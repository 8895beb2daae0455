"""What stands between the network and the HTTP apps: connection limits, a
read timeout, terse error bodies and the access log.

- ``HttpLimits``: the read timeout (a request's line and headers, then its
  body, must each arrive within it), the keep-alive idle timeout, the number
  of connections one listener holds, and the parser's size limits.
- ``GuardedSite``: a TCP site whose connections are ``_Connection``s:
  aiohttp's ``RequestHandler`` plus the connection limit (a connection over
  it is answered 503 and closed at once), a header-read watchdog (aiohttp has
  none of its own: its keep-alive timer only starts after a response, or at
  connect, and runs for the long keep-alive period), and terse,
  traceback-free answers to malformed HTTP.
- ``boundary``: the middleware that turns every 4xx/5xx into a fixed small
  JSON body (never the path, query, headers or body it was sent) and writes
  one access-log line per request.

The access log (logger ``fedtoken.http.access``, INFO) holds the method, the
route template (never the raw path or query), the status, the duration, the
peer address, the authenticated introspection client (or "-") and markers
such as ``auth=failed``; never a token, a secret, an Authorization header or
a form body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

__all__ = ["ACCESS_LOG", "LIMITS_KEY", "NOTE_KEY", "GuardedSite", "HttpLimits", "Note",
           "boundary", "peer_certificate", "terse"]

log = logging.getLogger("fedtoken.http")
access_log = logging.getLogger("fedtoken.http.access")
ACCESS_LOG = access_log.name

SERVER = "fedtoken"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                      "CONNECT"})
_ERRORS = {400: "invalid_request", 401: "invalid_client", 404: "not_found",
           405: "method_not_allowed", 500: "server_error", 503: "temporarily_unavailable"}
# Headers an error response may keep from the exception aiohttp raised.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate", "Cache-Control")


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what one client connection may hold of the server."""

    # A request's line and headers, and then its body, must each arrive
    # within this many seconds (of the connection opening, or of a request's
    # first byte on an idle keep-alive connection).
    read_timeout: float = 10.0
    # An idle keep-alive connection is closed after this many seconds.
    keepalive_timeout: float = 30.0
    # Connections one listener holds at once; more are answered 503 and closed.
    max_connections: int = 1024
    # Parser limits (aiohttp's own defaults, but fewer headers).
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64
    # After a response, how long unread request body is drained before closing.
    lingering_time: float = 2.0

    @classmethod
    def from_settings(cls, settings: object) -> HttpLimits:
        """The limits a ``Settings`` gives (fields it lacks keep the defaults)."""
        d = cls()
        return cls(
            read_timeout=float(getattr(settings, "http_read_timeout_seconds", d.read_timeout)),
            keepalive_timeout=float(getattr(settings, "http_keepalive_seconds",
                                            d.keepalive_timeout)),
            max_connections=int(getattr(settings, "http_max_connections", d.max_connections)),
        )

    def handler_kwargs(self) -> dict[str, Any]:
        return {"keepalive_timeout": self.keepalive_timeout, "max_line_size": self.max_line_size,
                "max_field_size": self.max_field_size, "max_headers": self.max_headers,
                "lingering_time": min(self.lingering_time, self.read_timeout),
                "access_log": None}


LIMITS_KEY = web.AppKey("fedtoken_http_limits", HttpLimits)


def terse(status: int, error: str | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    """The only kind of error body: {"error": <fixed code>}."""
    code = error or _ERRORS.get(status) or ("server_error" if status >= 500
                                            else "invalid_request")
    body = json.dumps({"error": code}, separators=(",", ":"))
    return web.Response(status=status, text=body, content_type="application/json",
                        headers={"Server": SERVER, **(headers or {})})


# --- the access log -------------------------------------------------------------


class Note:
    """What a handler tells the access log about a request (never secrets)."""

    __slots__ = ("client", "marks")

    def __init__(self) -> None:
        self.client = "-"
        self.marks: list[str] = []


NOTE_KEY = web.RequestKey("fedtoken_http_note", Note)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "-"


def _method(method: str) -> str:
    return method if method in _METHODS else "OTHER"


def _log_access(method: str, route: str, status: int, ms: float | None, peer: str | None,
                client: str, marks: list[str]) -> None:
    if not access_log.isEnabledFor(logging.INFO):
        return
    duration = "-" if ms is None else f"{ms:.1f}ms"
    tail = "".join(" " + m for m in marks)
    access_log.info("%s %s %d %s %s client=%s%s", method, route, status, duration,
                    peer or "-", client, tail)


def _normalise(resp: web.StreamResponse) -> web.StreamResponse:
    """A 4xx/5xx that is not already one of our JSON bodies becomes one."""
    if resp.status < 400:
        if isinstance(resp, web.HTTPException):  # raised, not returned: send a copy
            kept = {h: resp.headers[h] for h in ("Location", "ETag", "Cache-Control")
                    if h in resp.headers}
            return web.Response(status=resp.status, headers=kept)
        return resp
    if isinstance(resp, web.HTTPException) or resp.content_type != "application/json":
        kept = {h: resp.headers[h] for h in _KEPT_HEADERS if h in resp.headers}
        own = _own_error(resp)
        return terse(resp.status, own, kept)
    return resp


def _own_error(resp: web.StreamResponse) -> str | None:
    # Our handlers raise HTTPExceptions with a JSON {"error": code} text.
    if isinstance(resp, web.HTTPException) and resp.content_type == "application/json":
        try:
            error = json.loads(resp.text or "")["error"]
        except (ValueError, KeyError, TypeError):
            return None
        return error if isinstance(error, str) else None
    return None


@web.middleware
async def boundary(request: web.Request,
                   handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Terse errors and one access-log line for every request an app sees."""
    started = time.perf_counter()
    note = Note()
    request[NOTE_KEY] = note
    status = 500
    try:
        try:
            resp: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            resp = exc
        except asyncio.CancelledError:  # the client went away
            status = 499
            note.marks.append("cancelled")
            raise
        except Exception:  # a bug: say so in our log, tell the caller nothing
            log.exception("unhandled error serving %s %s", _method(request.method),
                          _route(request))
            resp = terse(500)
        resp = _normalise(resp)
        resp.headers["Server"] = SERVER
        status = resp.status
        return resp
    finally:
        _log_access(_method(request.method), _route(request), status,
                    (time.perf_counter() - started) * 1000, request.remote, note.client,
                    note.marks)


# --- connections -----------------------------------------------------------------


class _Tally:
    """Counts an event and reports it at most once per ``every`` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, message: str,
                 every: float = 10.0) -> None:
        self._loop, self._message, self._every = loop, message, every
        self._count = 0
        self._flush: asyncio.TimerHandle | None = None
        self._last = -every

    def add(self) -> None:
        self._count += 1
        now = self._loop.time()
        if now - self._last >= self._every:
            self.report()
        elif self._flush is None:
            self._flush = self._loop.call_at(self._last + self._every, self.report)

    def report(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._count:
            log.warning(self._message, self._count)
            self._count = 0
            self._last = self._loop.time()

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


class _Listener:
    """State shared by the connections of one site."""

    def __init__(self, limits: HttpLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.open = 0
        self.refused = _Tally(loop, "refused %d connection(s): over the limit of "
                              f"{limits.max_connections} open connections")
        self.expired = _Tally(loop, "closed %d connection(s) whose request did not arrive "
                              f"within the {limits.read_timeout:g} s read timeout")


_BUSY_BODY = b'{"error":"temporarily_unavailable"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nServer: fedtoken\r\n"
         b"Content-Type: application/json\r\nContent-Length: %d\r\nRetry-After: 1\r\n"
         b"Connection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class _Connection(RequestHandler):
    """aiohttp's protocol plus the listener's limits.

    The watchdog reads a few of RequestHandler's attributes (aiohttp 3.14):
    ``_waiter`` is pending exactly while the handler waits for a request's
    line and headers, and ``_request_count`` grows when one has been parsed
    (or has failed to parse). tests/unit/test_http_apps.py pins the
    behaviour over real sockets.
    """

    __slots__ = ("_admitted", "_deadline", "_listener")

    def __init__(self, manager: web.Server, listener: _Listener, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self._admitted = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self._listener
        if listener.open >= listener.limits.max_connections:
            self._refuse(transport)
            return
        listener.open += 1
        self._admitted = True
        super().connection_made(transport)
        self._arm()

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        """503 and close. What the client already sent is read and dropped for
        a moment, so that closing does not reset the connection before the
        client has read the answer."""
        self._listener.refused.add()
        if not isinstance(transport, asyncio.Transport):
            transport.close()
            return
        transport.write(_BUSY)
        if transport.can_write_eof():
            transport.write_eof()
        self._deadline = self._loop.call_later(min(1.0, self._listener.limits.read_timeout),
                                               transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            self._disarm()
            return
        self._admitted = False
        self._listener.open -= 1
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return  # refused: dropped
        if data and self._deadline is None and self._awaiting_request():
            self._arm()  # the first byte of a request on an idle keep-alive connection
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._disarm()

    def _awaiting_request(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(self._listener.limits.read_timeout,
                                               self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        # Still waiting for the request line and headers: give up on it.
        if self._awaiting_request() and self.transport is not None:
            self._listener.expired.add()
            self.force_close()

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Malformed HTTP (or an error outside the app): a terse answer and one
        log line; the parser's message, which quotes the input, goes nowhere."""
        if status == 500 and exc is not None:  # a bug, not the caller's input
            log.error("unhandled error outside the app", exc_info=exc)
        kind = type(exc).__name__ if exc is not None else str(status)
        _log_access("-", "-", status, None, request.remote, "-",
                    [f"malformed={kind}" if status < 500 else f"error={kind}"])
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        resp = terse(status)
        resp.force_close()
        return resp


class GuardedSite(web.TCPSite):
    """A TCP site serving ``runner``'s app through ``_Connection``s."""

    __slots__ = ("_limits", "_listener")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, limits: HttpLimits,
                 reuse_port: bool = False, backlog: int = 1024,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port, backlog=backlog,
                         ssl_context=ssl_context)
        self._limits = limits
        self._listener: _Listener | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        listener = self._listener = _Listener(self._limits, loop)
        kwargs = self._limits.handler_kwargs()

        def connection() -> _Connection:
            return _Connection(server, listener, loop=loop, **kwargs)

        self._server = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog, ssl=self._ssl_context,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        if self._listener is not None:
            self._listener.refused.report()
            self._listener.expired.report()
            self._listener.refused.close()
            self._listener.expired.close()


def peer_certificate(request: web.Request) -> bytes | None:
    """The DER client certificate the TLS handshake verified (the bridge asks
    for one when it has a client CA), or None."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der if isinstance(der, bytes) else None
