"""An ``httpx`` transport over the standard library's ``http.client``.

The fetch layer sends every request through one ``httpx.Client`` (headers,
timeouts, redirects, the exception types it classifies).  httpx's own transport
parses HTTP/1.1 in pure Python (``h11``): measured on loopback nginx, 1.3-1.9 ms
of CPU per 300 KB image, against 0.3 ms for ``http.client``, whose response
reading is done in C -- at 2 cores that is a quarter of the decode budget.  This
transport keeps ``http.client`` connections alive in a pool (per scheme, host
and port; at most ``max_idle`` idle ones kept) and maps its failures onto
httpx's exceptions, so everything above it is unchanged:

==================================  ================================
``http.client`` / socket            httpx
==================================  ================================
connect refused / unreachable       ``ConnectError``
timeout while connecting            ``ConnectTimeout``
timeout while reading               ``ReadTimeout``
body shorter than Content-Length    ``RemoteProtocolError`` ("peer closed
                                    connection without sending complete
                                    message body")
closed before / reset during        ``RemoteProtocolError`` / ``ReadError``
==================================  ================================

An idle connection is checked before reuse (a readable idle socket has been
closed by the server); a request on a kept-alive connection that fails before
any byte of a response anyway is sent once more on a new connection, and the
host's other idle connections are dropped with it.  The unread body of a
status >= 300 (a redirect, an error page) is read and discarded when it is
small (``DRAIN_LIMIT``), so that a burst of 404s or 503s keeps its connection;
a larger one, or one of unknown length, closes it.
Environment proxies (``HTTP(S)_PROXY``, ``ALL_PROXY``) are not handled here:
the fetch layer then uses httpx's default transport.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

import httpx

__all__ = ["StdlibTransport", "env_proxies"]

CHUNK = 1 << 20
DRAIN_LIMIT = 64 << 10       # the largest unread body read to its end to keep a connection
# what httpx's client would send, less compression (the bodies are images)
_DEFAULT_HEADERS = ((b"accept", b"*/*"), (b"accept-encoding", b"identity"),
                    (b"user-agent", b"datago"))


def env_proxies() -> bool:
    import urllib.request
    return any(k in ("http", "https", "all") for k in urllib.request.getproxies())


def _alive(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection is still usable: an idle socket that
    is readable has been closed by the server (or sent something unasked)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        poller = select.poll()                  # (select() fails past fd 1023)
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False


def _drain(resp: http.client.HTTPResponse) -> bool:
    """Read and discard the rest of a body of at most ``DRAIN_LIMIT`` bytes (its
    Content-Length, or a chunked body that ends by then): True when the response
    ended cleanly and its connection may serve another request; False when the
    body is larger, of unknown length or broken (the caller closes it)."""
    if resp.will_close or (resp.length or 0) > DRAIN_LIMIT:
        return False
    try:
        resp.read(DRAIN_LIMIT + 1)
    except (OSError, http.client.HTTPException):
        return False
    return resp.isclosed() and not resp.length   # (a short body also ends "closed")


def _chunks(resp: http.client.HTTPResponse, partial: bool, request=None):
    """The body of ``resp`` in pieces, its failures as httpx exceptions.  A stream
    (``partial``) gets what has arrived, so a broken one loses little; a whole body
    is read in large pieces."""
    read = resp.read1 if partial else resp.read
    try:
        while True:
            data = read(CHUNK)
            if not data:
                break
            yield data
        if resp.length:                  # read(amt) ends quietly where the peer closed
            raise http.client.IncompleteRead(b"", resp.length)
    except http.client.IncompleteRead:
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body "
            "(incomplete read)", request=request) from None
    except socket.timeout:
        raise httpx.ReadTimeout("timed out reading the body", request=request) from None
    except (OSError, http.client.HTTPException) as e:
        raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from None


class _Body(httpx.SyncByteStream):
    """A response body read from its connection; the connection goes back to the
    pool once the body is read to its end."""

    def __init__(self, transport: "StdlibTransport", key, conn, resp, request):
        self._t, self._key, self._conn, self._resp, self._request = \
            transport, key, conn, resp, request

    def __iter__(self):
        partial = self._request.extensions.get("partial_reads")
        try:
            yield from _chunks(self._resp, partial, self._request)
        except httpx.TransportError:
            self._discard()
            raise
        self._release()

    def _release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self._resp.length == 0:
            self._resp.close()         # read1 leaves a finished body open (not reusable)
        if self._resp.will_close or not self._resp.isclosed():
            conn.close()
        else:
            self._t._put(self._key, conn)

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        if self._conn is None:
            return
        if self._resp.isclosed() or (self._resp.status >= 300 and _drain(self._resp)):
            self._release()
        else:                                  # closed before the end: cannot reuse
            self._discard()


class StdlibTransport(httpx.BaseTransport):
    """See the module docstring."""

    def __init__(self, *, timeout: float, verify: bool = True, max_idle: int = 64):
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: Dict[Tuple[str, str, int], List[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl: Optional[ssl.SSLContext] = None
        self._verify = verify

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            if not self._verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl = ctx
        return self._ssl

    def _get(self, key, fresh: bool = False):
        """A connection to ``key``: an idle one that is still open, else a new one
        (always a new one with ``fresh``, after dropping the idle ones)."""
        with self._lock:
            pool = self._idle.get(key)
            if fresh and pool:
                stale, self._idle[key] = pool, []
                for conn in stale:
                    conn.close()
            while pool and not fresh:
                conn = pool.pop()
                if _alive(conn):
                    return conn, True
                conn.close()
        scheme, host, port = key
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self._context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return conn, False

    def _put(self, key, conn) -> None:
        with self._lock:
            pool = self._idle.setdefault(key, [])
            if sum(len(p) for p in self._idle.values()) < self.max_idle:
                pool.append(conn)
                return
        conn.close()

    def _timeout(self, request: httpx.Request, what: str) -> Optional[float]:
        t = request.extensions.get("timeout", {}).get(what)
        return self.timeout if t is None else t

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}", request=request)
        key = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        body = request.read() if request.method not in ("GET", "HEAD") else None
        conn, resp = self._send(key, request.method, url.raw_path.decode("ascii"),
                                request.headers.raw, body, self._timeout(request, "connect"),
                                self._timeout(request, "read"), True, request)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.getheaders()]
        return httpx.Response(resp.status, headers=headers,
                              stream=_Body(self, key, conn, resp, request),
                              extensions={"http_version": b"HTTP/1.1"}, request=request)

    def get(self, url: str, headers: Dict[str, str]):
        """A GET of a whole body without httpx's request and response objects (their
        URL parsing and header models cost ~0.25 ms of CPU per request, a third of
        the fetch): ``(status, headers, body)``, headers an ``email.message.Message``
        (case-insensitive ``get``).  ``url``: an ASCII, already percent-encoded
        http(s) URL.  The body of a status >= 300 is not returned (b""): a small
        one is read and discarded to keep the connection (``_drain``), else the
        connection is closed.  Failures raise the httpx exceptions of the table."""
        p = urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise httpx.UnsupportedProtocol(f"unsupported URL {p.scheme}://")
        key = (p.scheme, p.hostname, p.port or (443 if p.scheme == "https" else 80))
        target = (p.path or "/") + ("?" + p.query if p.query else "")
        items = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        given = {k.lower() for k, _ in items}
        items += [(k, v) for k, v in _DEFAULT_HEADERS if k not in given]
        skip_host = b"host" in given
        conn, resp = self._send(key, "GET", target, items, None, self.timeout, self.timeout,
                                skip_host)
        if resp.status >= 300:
            if _drain(resp):
                self._put(key, conn)
            else:
                conn.close()
            return resp.status, resp.msg, b""
        try:
            body = b"".join(_chunks(resp, False))
        except httpx.TransportError:
            conn.close()
            raise
        if resp.will_close or not resp.isclosed():
            conn.close()
        else:
            self._put(key, conn)
        return resp.status, resp.msg, body

    def _send(self, key, method: str, target: str, header_items, body, connect_timeout,
              read_timeout, skip_host: bool, request=None):
        """``(connection, response)`` once the response's head has arrived, on an idle
        connection of the pool or a new one; failures as httpx exceptions."""
        for attempt in range(2):
            conn, reused = self._get(key, fresh=attempt > 0)
            connected = conn.sock is not None
            try:
                if not connected:
                    conn.timeout = connect_timeout
                    conn.connect()
                conn.sock.settimeout(read_timeout)
                conn.putrequest(method, target, skip_host=skip_host, skip_accept_encoding=True)
                for k, v in header_items:
                    conn.putheader(k, v)
                conn.endheaders(body)
                return conn, conn.getresponse()
            except socket.timeout:
                conn.close()
                if not connected:
                    raise httpx.ConnectTimeout("timed out connecting", request=request) from None
                raise httpx.ReadTimeout("timed out waiting for the response",
                                        request=request) from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if reused and attempt == 0:
                    continue                      # a stale kept-alive connection: once more
                if isinstance(e, http.client.RemoteDisconnected):
                    raise httpx.RemoteProtocolError("Server disconnected without sending a "
                                                    "response.", request=request) from None
                raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from None
            except ssl.SSLError as e:
                conn.close()
                raise httpx.ConnectError(f"TLS: {e}", request=request) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if not connected:
                    raise httpx.ConnectError(f"{type(e).__name__}: {e}", request=request) from None
                raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from None
        raise AssertionError("unreachable")               # pragma: no cover

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()
