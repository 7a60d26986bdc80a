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

Whole-body GETs (``StdlibTransport.get``, the fetch layer's short way for every
image and member) skip ``http.client``'s response parsing too: the request is
written to the pooled connection's socket and the response read by
``_receive`` (status line, headers split by hand, a Content-Length body read
with ``recv`` into fresh buffers and joined once; chunked and read-to-close
bodies; interim 1xx replies skipped).  Measured on loopback nginx, 318 KB
images: 0.21-0.29 ms of CPU per request against 0.45-0.55 ms through
``http.client`` (whose e-mail header parser, buffered file and zero-filled
buffers were half of it).  Streams and other methods keep ``http.client``.
"""

from __future__ import annotations

import http.client
import re
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

    def get(self, url: str, headers: Dict[str, str], max_body: Optional[int] = None):
        """A GET of a whole body without httpx's request and response objects (their
        URL parsing and header models cost ~0.25 ms of CPU per request) nor
        ``http.client``'s response parsing (its e-mail header parser and buffered
        file cost as much again): the request is written to and the response read
        from the pooled connection's socket by ``_receive``.  Returns
        ``(status, headers, body)``, headers a ``Headers`` (case-insensitive
        ``get``).  ``url``: an ASCII, already percent-encoded http(s) URL.  The
        body of a status >= 300 is not returned (b""): a small one is read and
        discarded to keep the connection, else the connection is closed.  A body
        over ``max_body`` bytes is None (not read, or read no further than the
        limit; the connection is closed).  Failures raise the httpx exceptions of
        the table."""
        p = urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise httpx.UnsupportedProtocol(f"unsupported URL {p.scheme}://")
        default = 443 if p.scheme == "https" else 80
        key = (p.scheme, p.hostname, p.port or default)
        target = (p.path or "/") + ("?" + p.query if p.query else "")
        head = _request_head(target, key[1], key[2], default, headers)

        def exchange(conn):
            conn.sock.sendall(head)
            return _receive(conn.sock, max_body)

        conn, (status, msg, body, keep) = self._exchange(key, self.timeout, self.timeout,
                                                         exchange)
        if keep:
            self._put(key, conn)
        else:
            conn.close()
        return status, msg, body

    def _send(self, key, method: str, target: str, header_items, body, connect_timeout,
              read_timeout, skip_host: bool, request=None):
        """``(connection, response)`` through ``http.client`` once the response's head
        has arrived (``_exchange``)."""
        def exchange(conn):
            conn.putrequest(method, target, skip_host=skip_host, skip_accept_encoding=True)
            for k, v in header_items:
                conn.putheader(k, v)
            conn.endheaders(body)
            try:
                return conn.getresponse()
            except http.client.RemoteDisconnected:
                raise _Silent() from None

        return self._exchange(key, connect_timeout, read_timeout, exchange, request)

    def _exchange(self, key, connect_timeout, read_timeout, exchange, request=None):
        """``(connection, exchange(connection))`` on an idle connection of the pool or a
        new one, its failures as httpx exceptions.  A kept-alive connection the
        server closed before answering (``_Silent``, a reset or broken pipe) is
        dropped, with the host's other idle ones, and the request sent once more
        on a new connection."""
        for attempt in range(2):
            conn, reused = self._get(key, fresh=attempt > 0)
            connected = conn.sock is not None
            try:
                if not connected:
                    conn.timeout = connect_timeout
                    conn.connect()
                conn.sock.settimeout(read_timeout)
                return conn, exchange(conn)
            except httpx.TransportError:
                conn.close()
                raise
            except socket.timeout:
                conn.close()
                if not connected:
                    raise httpx.ConnectTimeout("timed out connecting", request=request) from None
                raise httpx.ReadTimeout("timed out waiting for the response",
                                        request=request) from None
            except (_Silent, BrokenPipeError, ConnectionResetError) as e:
                conn.close()
                if reused and attempt == 0:
                    continue                      # a stale kept-alive connection: once more
                if isinstance(e, _Silent) and not e.reset:
                    raise httpx.RemoteProtocolError("Server disconnected without sending a "
                                                    "response.", request=request) from None
                text = e.reset if isinstance(e, _Silent) else f"{type(e).__name__}: {e}"
                if not connected:
                    raise httpx.ConnectError(text, request=request) from None
                raise httpx.ReadError(text, request=request) from None
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


# ----------------------------------------------------------------------------- short way
# A response read straight from the socket: the head up to its blank line (at most
# HEAD_LIMIT bytes), then a body of Content-Length bytes read into one buffer, a
# chunked body, or (neither) everything until the peer closes.

HEAD_LIMIT = 64 << 10
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_BAD_TARGET = re.compile("[\x00-\x20\x7f]")


class Headers(dict):
    """A response's headers: names lower-case; ``get``, ``[]`` and ``in`` ignore
    case; a repeated header's values are joined with ", "."""

    __slots__ = ()

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name):
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


class _Silent(Exception):
    """The peer closed (``reset``: reset, with its message) the connection before
    any byte of a response: on a kept-alive connection, a stale one."""

    def __init__(self, reset: str = ""):
        super().__init__(reset)
        self.reset = reset


def _request_head(target: str, host: str, port: int, default: int,
                  headers: Dict[str, str]) -> bytes:
    """The bytes of a GET request: ``headers``, then whatever of Host and
    ``_DEFAULT_HEADERS`` they do not name.  A name that is not a token, a value
    with CR, LF or NUL, or a target with spaces or controls is a ValueError (no
    header can smuggle another, nor a second request)."""
    if _BAD_TARGET.search(target):
        raise ValueError(f"invalid request target {target[:80]!r}")
    lines = [b"GET " + target.encode("ascii") + b" HTTP/1.1"]
    given = set()
    for k, v in headers.items():
        kb, vb = k.encode("latin-1"), str(v).encode("latin-1")
        if not _TOKEN.match(kb):
            raise ValueError(f"invalid header name {k!r}")
        if _BAD_VALUE.search(vb):
            raise ValueError(f"invalid value for header {k!r}")
        given.add(kb.lower())
        lines.append(kb + b": " + vb)
    if b"host" not in given:
        h = f"[{host}]" if ":" in host else host
        lines.insert(1, b"Host: " + (h if port == default else f"{h}:{port}").encode("idna"))
    lines += [k + b": " + v for k, v in _DEFAULT_HEADERS if k not in given]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _parse_head(head: bytes) -> Tuple[bytes, int, Headers]:
    lines = head.split(b"\n")
    status_line = lines[0].rstrip(b"\r")
    parts = status_line.split(None, 2)
    if (len(parts) < 2 or not parts[0].startswith(b"HTTP/") or len(parts[1]) != 3
            or not parts[1].isdigit()):
        raise httpx.RemoteProtocolError(f"bad status line {status_line[:80]!r}")
    msg = Headers()
    last = None
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and last is not None:     # an obsolete folded line
            dict.__setitem__(msg, last, f"{msg[last]} {line.strip().decode('latin-1')}")
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}")
        last = name.decode("latin-1").lower()
        value = value.strip().decode("latin-1")
        old = dict.get(msg, last)
        dict.__setitem__(msg, last, value if old is None else f"{old}, {value}")
    return parts[0], int(parts[1]), msg


class _Reader:
    """The bytes of one connection after a response's head: what arrived with the
    head first, then the socket."""

    __slots__ = ("sock", "data")

    def __init__(self, sock, data: bytes):
        self.sock, self.data = sock, data

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body "
                "(incomplete chunked read)")
        self.data += chunk

    def line(self) -> bytes:
        while True:
            i = self.data.find(b"\n")
            if i >= 0:
                out, self.data = self.data[:i + 1], self.data[i + 1:]
                return out
            if len(self.data) > 4096:
                raise httpx.RemoteProtocolError("chunk size line too long")
            self._fill()

    def exactly(self, n: int) -> bytes:
        """``n`` bytes: what is here already, then reads of the rest straight from
        the socket into fresh buffers (no zero-filled buffer, one join)."""
        have = len(self.data)
        if have >= n:
            out, self.data = (self.data, b"") if have == n else (self.data[:n], self.data[n:])
            return out
        parts = [self.data] if have else []
        self.data = b""
        got = have
        recv = self.sock.recv
        while got < n:
            chunk = recv(n - got)
            if not chunk:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    f"(incomplete read: {got} of {n} bytes)")
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunked(self, limit: Optional[int] = None) -> Optional[bytes]:
        """A chunked body (its trailers skipped); None once it passes ``limit``."""
        parts, total = [], 0
        while True:
            size_line = self.line().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_line[:20]!r}") from None
            if size == 0:
                while self.line().strip():             # trailers, then the blank line
                    pass
                return b"".join(parts)
            total += size
            if limit is not None and total > limit:
                return None
            parts.append(self.exactly(size))
            if self.exactly(2) != b"\r\n":
                raise httpx.RemoteProtocolError("a chunk does not end with CRLF")

    def rest(self, limit: Optional[int] = None) -> Optional[bytes]:
        """Everything until the peer closes; None once it passes ``limit``."""
        parts = [self.data]
        total = len(self.data)
        self.data = b""
        while True:
            if limit is not None and total > limit:
                return None
            chunk = self.sock.recv(CHUNK)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            total += len(chunk)


def _read_head(sock, data: bytes = b"") -> Tuple[bytes, bytes]:
    """(head, what followed it), starting from ``data`` (what followed an interim
    response); ``_Silent`` when the peer closes or resets before the first byte."""
    start = 0
    while True:
        crlf, lf = data.find(b"\n\r\n", start), data.find(b"\n\n", start)
        if crlf >= 0 and (lf < 0 or crlf < lf):
            return data[:crlf], data[crlf + 3:]
        if lf >= 0:                             # (a head with bare LF line ends)
            return data[:lf], data[lf + 2:]
        if len(data) > HEAD_LIMIT:
            raise httpx.RemoteProtocolError(f"response head over {HEAD_LIMIT} bytes")
        start = max(0, len(data) - 2)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError as e:
            if not data:
                raise _Silent(f"{type(e).__name__}: {e}") from None
            raise
        if not chunk:
            if not data:
                raise _Silent()
            raise httpx.RemoteProtocolError("peer closed connection in the middle of a "
                                            "response head")
        data += chunk


def _content_length(msg: Headers) -> Optional[int]:
    value = msg.get("content-length")
    if value is None:
        return None
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}")
    return int(values.pop())


def _receive(sock, max_body: Optional[int] = None) -> Tuple[int, Headers, Optional[bytes], bool]:
    """Read one response to a GET: ``(status, headers, body, keep)``, ``keep`` when
    the connection may serve another request.  A status >= 300 gets b"" (a body of
    at most ``DRAIN_LIMIT`` bytes read and dropped, a larger one left unread and
    the connection not kept).  A body over ``max_body`` bytes is None: left unread
    when its Content-Length says so, else read no further than the limit; the
    connection is not kept.  Interim (1xx) responses are skipped."""
    first = b""
    while True:                         # interim responses (1xx but 101) are skipped
        head, first = _read_head(sock, first)
        version, status, msg = _parse_head(head)
        if not 100 <= status < 200 or status == 101:
            break
    tokens = {t.strip().lower() for t in msg.get("connection", "").split(",")}
    keep = "close" not in tokens and (version != b"HTTP/1.0" or "keep-alive" in tokens)
    reader = _Reader(sock, first)
    chunked = "chunked" in msg.get("transfer-encoding", "").lower()
    length = None if chunked else _content_length(msg)
    error = status >= 300
    try:
        if status in (204, 304):
            body = b""
        elif chunked:
            body = reader.chunked(DRAIN_LIMIT if error else max_body)
            if body is None:
                return status, msg, b"" if error else None, False
        elif length is not None:
            if error and length > DRAIN_LIMIT:
                return status, msg, b"", False
            if not error and max_body is not None and length > max_body:
                return status, msg, None, False
            body = reader.exactly(length)
        else:
            if error:
                return status, msg, b"", False
            body, keep = reader.rest(max_body), False
    except socket.timeout:
        raise httpx.ReadTimeout("timed out reading the body") from None
    except OSError as e:
        raise httpx.ReadError(f"{type(e).__name__}: {e}") from None
    if reader.data:                     # bytes past the response: not reusable
        keep = False
    return status, msg, b"" if error else body, keep
