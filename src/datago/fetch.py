"""The fetch layer: bytes at a location -- a local file, an ``http(s)://`` URL, or
a byte range of either (a member of an archive at a known offset).

    fetcher = Fetcher(FetchConfig(io_concurrency=64, timeout_s=30))
    data = fetcher.read("https://host/data/cat.jpg")
    data = fetcher.read(Member("https://host/shard-000.tar", offset=1536, size=48213))

Remote reads go through one shared ``httpx`` client per process (a keep-alive
pool sized to ``io_concurrency``; TLS verified), whose transport is the
standard library's ``http.client`` (``datago._http``: ~5x less CPU per request
than httpx's pure-Python HTTP/1.1 parser); whole-body GETs read their response
straight from the pooled socket (``StdlibTransport.get``).  Failures are classified once,
here:

===================  ============================  =====================
what happened        retried?                      reason (stats key)
===================  ============================  =====================
connect error,       yes, jittered exponential     ``connect`` / ``reset``
reset, EOF           backoff
read/connect         yes                           ``timeout``
timeout
5xx                  yes                           ``http_5xx``
429                  yes, after ``Retry-After``    ``http_429``
body shorter than    yes                           ``truncated``
Content-Length
other 4xx            no                            ``http_4xx``
an HTML page         no                            ``wrong_content_type``
a redirect loop,     no                            ``redirect``
more than 10, to a
non-HTTP(S) place,
a 3xx not followed
a body over          no (its body is not read)     ``too_large``
``max_object_bytes``
a member's Range     no                            ``range_ignored``
ignored (HTTP 200)
on an object over
16 MiB
a 206 whose          no                            ``bad_range``
Content-Range is not
the range asked for
(or, resuming a
stream, not its
next byte)
an archive whose     no                            ``stale_index``
size is not the one
its index was made
for
a compressed range,  no                            ``wrong_content_type``
a coding other than
gzip or deflate
local OSError        no                            ``read_error``
===================  ============================  =====================

Every body read whole is bounded: by ``max_object_bytes`` (1 GiB), a file's by its
size before it is read, a response's by its ``Content-Length`` before its body
is read (or as it arrives, when it has none).  A member read by offset whose
server ignores ``Range`` and answers with the whole object is cut from it when
that object is small (at most 16 MiB, or ``max_object_bytes`` if smaller); a
larger one fails as ``range_ignored`` rather than arriving whole once per member.
Streams (``stream``: shards read whole) are not bounded by it.  Requests ask for
``identity``; a whole body compressed anyway (gzip, deflate) is inflated here,
within the same bound.

Redirects (301, 302, 303, 307, 308) are followed here, each URL requested once,
by the rules of httpx's client: a relative ``Location`` resolved against the
URL that answered, and the credentials -- ``Authorization`` (a token, an S3
signature), ``Proxy-Authorization``, ``Cookie`` and the ``X-Amz-*`` signing
headers (an S3 session token) -- dropped when a redirect leaves the origin
(scheme, host, port), except from ``http`` to ``https`` on the same host and
default ports.  A signed ``s3://`` request redirected where its credentials go
is signed afresh for the new URL (a SigV4 signature covers the path: the old one
would be refused there), its other headers (``Range``) kept; one redirected to
another origin goes unsigned, as above.  S3's answer to a request signed for
another region than the bucket's -- a 301 without a ``Location`` (``redirect``),
or a 400 (``http_4xx``), naming the bucket's region in ``x-amz-bucket-region``
-- fails with a message that names that region and ``AWS_REGION``; it is not
retried in the other region.

When the retries or the per-location ``deadline_s`` run out, ``FetchError``
carries the reason of the last failure, the URL with its query string and
credentials removed (``redact``), and the HTTP status when there was one.
Secrets (tokens in headers, signatures in query strings, passwords in URLs)
never appear in messages or reprs.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

from datago.errors import DatagoError

__all__ = ["FetchConfig", "FetchError", "Fetcher", "Inline", "Member", "is_remote", "redact"]


class FetchError(DatagoError, OSError):
    """Bytes that could not be fetched; ``reason`` names the cause (see the module
    docstring), ``url`` is redacted, ``status`` is the HTTP status or None."""

    def __init__(self, message: str, reason: str = "read_error", url: str = "",
                 status: Optional[int] = None, attempts: int = 1):
        super().__init__(message)
        self.reason = reason
        self.url = url
        self.status = status
        self.attempts = attempts

    def __reduce__(self):            # survives DataLoader's re-raise in the main process
        return (FetchError, (str(self), self.reason, self.url, self.status, self.attempts))


@dataclass(frozen=True)
class Member:
    """``size`` bytes at ``offset`` of the file or URL ``url`` (an archive member)."""
    url: str
    offset: int
    size: int
    name: str = ""            # the member's name (its extension tells the format)
    codec: str = ""           # how the stored bytes become the content (datago._codecs)
    raw_size: int = 0         # the content's size, for codecs that inflate
    crc32: int = -1           # the content's CRC-32 to check (a ZIP member's), -1: none
    total: int = -1           # the size of ``url`` the offset was taken from, -1: unknown

    def __str__(self) -> str:
        return f"{redact(self.url)}[{self.offset}:{self.offset + self.size}]"


@dataclass(frozen=True)
class Inline:
    """Bytes already in memory: a member of an archive read as a stream."""
    data: bytes = field(repr=False)
    name: str = ""

    def __str__(self) -> str:
        return f"{self.name or 'inline'} ({len(self.data)} bytes, streamed)"


Location = Union[str, Member, Inline]


def is_remote(loc: Location) -> bool:
    if isinstance(loc, Inline):
        return False
    url = loc.url if isinstance(loc, Member) else loc
    return isinstance(url, str) and url.startswith(("http://", "https://", "s3://"))


class _S3:
    """``s3://bucket/key`` to a signed HTTPS request: the standard AWS credential
    chain and SigV4 from botocore; ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``
    (path-style) for S3-compatible stores, region from ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION`` / the AWS config (default us-east-1)."""

    # what ``sign`` adds: replaced, never kept, when a request is signed again
    SIGNATURE = frozenset(("authorization", "x-amz-date", "x-amz-content-sha256",
                           "x-amz-security-token"))

    def __init__(self):
        try:
            import botocore.session
            from botocore.auth import S3SigV4Auth
            from botocore.awsrequest import AWSRequest
        except ImportError:
            raise FetchError("s3:// locations need botocore (pip install botocore)",
                             "read_error") from None
        session = botocore.session.get_session()
        self._creds = session.get_credentials()
        self.region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or session.get_config_variable("region") or "us-east-1")
        self.endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3")
                         or os.environ.get("AWS_ENDPOINT_URL") or "").rstrip("/")
        self._auth, self._request = S3SigV4Auth, AWSRequest

    def url(self, loc: str) -> str:
        from urllib.parse import quote
        bucket, _, key = loc[len("s3://"):].partition("/")
        if not bucket or not key:
            raise FetchError(f"{redact(loc)}: an S3 location is s3://bucket/key", "read_error",
                             redact(loc))
        key = quote(key, safe="/~")
        if self.endpoint:
            return f"{self.endpoint}/{bucket}/{key}"
        return f"https://{bucket}.s3.{self.region}.amazonaws.com/{key}"

    def sign(self, url: str, headers: Dict[str, str]) -> Dict[str, str]:
        """``headers`` with a SigV4 signature of a GET of ``url`` (an ASCII,
        percent-encoded URL) in place of any signature they carry (a redirect's
        follow-up is signed again: ``_redirected``)."""
        if self._creds is None:                       # anonymous access (public buckets)
            return headers
        headers = {k: v for k, v in headers.items() if k.lower() not in self.SIGNATURE}
        req = self._request(method="GET", url=url, headers=headers)
        self._auth(self._creds.get_frozen_credentials(), "s3", self.region).add_auth(req)
        return dict(req.headers.items())


def redact(url: str) -> str:
    """``url`` without user info and query string (where signatures and tokens live)."""
    if not isinstance(url, str) or "://" not in url:
        return str(url)
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "..." if p.query else "", ""))


@dataclass(frozen=True)
class FetchConfig:
    """How remote bytes are fetched (``source_config`` keys of remote sources)."""

    io_concurrency: int = 64
    """Requests in flight per DataLoader worker (and connections in the pool)."""
    timeout_s: float = 30.0
    """Connect and read timeout of one request."""
    deadline_s: float = 120.0
    """Total time for one location, retries included; then it fails with its last reason."""
    retries: int = 5
    """Attempts after the first one, for the retryable failures."""
    backoff_s: float = 0.2
    """First backoff; doubled per attempt (full jitter), at most ``backoff_max_s``."""
    backoff_max_s: float = 10.0
    cache_dir: Optional[str] = None
    """With ``cache_limit_bytes``: an on-disk LRU cache of remote bytes (``datago._diskcache``)."""
    cache_limit_bytes: Optional[int] = None
    headers: Dict[str, str] = field(default_factory=dict, repr=False)
    """Extra request headers (e.g. ``Authorization``): never logged, never in a repr."""
    verify_tls: bool = True
    max_object_bytes: int = 1 << 30
    """The largest file or object read whole into memory; a larger one fails with
    reason ``too_large`` before its body is read (streams are not bounded by it)."""


# A ranged read (an archive member) that the server answers with the whole object
# (HTTP 200: it ignores Range) is cut here when the object is at most this large;
# a larger one fails as ``range_ignored`` instead of arriving whole for every member.
RANGE_WHOLE_LIMIT = 16 << 20


_MAX_REDIRECTS = 10
_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_CREDENTIALS = frozenset(("authorization", "proxy-authorization", "cookie"))
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")       # (an x-amz-bucket-region)


def _request_target(url) -> str:
    """An ``httpx.URL`` as the ASCII, percent-encoded URL the transport's short way
    takes (IDNA host, no userinfo or fragment)."""
    return f"{url.scheme}://{url.netloc.decode('ascii')}{url.raw_path.decode('ascii')}"


def _origin(url) -> tuple:
    return url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)


def _redirected(url: str, status: int, location: str, headers: Dict[str, str],
                chain: list, sign: Optional[Callable] = None):
    """``(url, headers)`` of the request a redirect from ``url`` to ``location`` asks
    for (see the module docstring for the rules); ``FetchError`` (``redirect``) for
    a Location that is not HTTP(S), a loop, or more than ``_MAX_REDIRECTS``.
    ``chain``: the URLs requested so far for this location, the new one appended.
    ``sign``: what signed the request (``_S3.sign``), or None: a request kept on its
    origin is signed again for the new URL, one that leaves it is not."""
    import httpx
    shown = redact(chain[0])
    try:
        old = httpx.URL(url)
        new = old.join(location.strip())
    except (httpx.InvalidURL, ValueError, TypeError):
        raise FetchError(f"{shown}: HTTP {status} with an invalid Location", "redirect",
                         shown, status) from None
    if new.scheme not in ("http", "https") or not new.host:
        raise FetchError(f"{shown}: HTTP {status} to a {new.scheme}: location, "
                         "not HTTP(S)", "redirect", shown, status)
    target = _request_target(new)
    if target in chain or target == _request_target(old):
        raise FetchError(f"{shown}: a redirect loop ({redact(url)} -> {redact(target)}, "
                         f"after {len(chain) - 1} redirects)", "redirect", shown, status)
    if len(chain) > _MAX_REDIRECTS:
        raise FetchError(f"{shown}: more than {_MAX_REDIRECTS} redirects", "redirect",
                         shown, status)
    chain.append(target)
    keep = _origin(old) == _origin(new) or (
        old.scheme == "http" and new.scheme == "https" and old.host == new.host
        and old.port in (None, 80) and new.port in (None, 443))
    headers = {k: v for k, v in headers.items()
               if k.lower() != "host" and (keep or not (
                   k.lower() in _CREDENTIALS or k.lower().startswith("x-amz-")))}
    if keep and sign is not None:
        headers = sign(target, headers)
    return target, headers


class _Head(NamedTuple):
    """What ``_check`` reads of a response (the transport's short way has no
    ``httpx.Response``)."""
    status_code: int
    headers: Any


def _plain_url(url: str) -> bool:
    """An http(s) URL that needs no normalising (ASCII, no spaces or controls): the
    transport's short way takes it as it is."""
    return url.isascii() and url.isprintable() and " " not in url and \
        url.startswith(("http://", "https://"))


class _Retry(Exception):
    def __init__(self, reason: str, message: str, status: Optional[int] = None,
                 wait: Optional[float] = None):
        super().__init__(message)
        self.reason, self.status, self.wait = reason, status, wait


def read_file(path, limit: int = FetchConfig.max_object_bytes) -> bytes:
    """A local file's bytes; ``FetchError`` when it cannot be read (``read_error``) or
    is over ``limit`` bytes (``too_large``, before it is read)."""
    try:
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            if total <= limit:
                data = f.read()
    except OSError as e:
        raise FetchError(f"cannot read {path}: {e.strerror or e}", "read_error",
                         str(path)) from None
    if total > limit:
        raise _over_limit(str(path), None, str(total), limit, None, None)
    if len(data) > limit:                          # (it grew while being read)
        raise _over_limit(str(path), None, None, limit, None, None)
    return data


def _read_at_most(resp, limit: int) -> Optional[bytes]:
    """The body of an httpx response, or None when it is over ``limit`` bytes (its
    Content-Length says so, or it passes the limit as it arrives)."""
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return None
    parts, total = [], 0
    for data in resp.iter_raw():
        total += len(data)
        if total > limit:
            return None
        parts.append(data)
    return b"".join(parts)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


def _check_total(size: int, total: int, loc: str) -> None:
    """A member is read from the file or object its offset was taken from: a size
    that differs means the archive changed since (its index is stale)."""
    if size != total:
        shown = redact(loc)
        raise FetchError(f"{shown} is {size:,} bytes, but its index was made for "
                         f"{total:,}: the archive changed since, so its offsets are "
                         f"stale (rebuild the index)", "stale_index", shown)


def _check_range(value: Optional[str], url: str, offset: int, size: int,
                 short_ok: bool, total: int = -1) -> None:
    """A 206's ``Content-Range`` must be the range asked for (a header probe's may
    end early, at the object's end): other bytes would be read as the member's.
    ``total`` (>= 0): the object's size the offsets were taken from, checked
    against the one the reply names."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    end = offset + size - 1
    if m is None or int(m[1]) != offset or not (
            int(m[2]) == end or (short_ok and offset <= int(m[2]) < end)):
        shown = redact(url)
        raise FetchError(f"{shown}: asked for bytes {offset}-{end}, the server sent "
                         f"Content-Range {(value or '(none)')[:80]!r}", "bad_range", shown, 206)
    if total >= 0 and m[3] != "*":
        _check_total(int(m[3]), total, url)


def _decoded(data: bytes, coding: str, url: str, status: int, ranged: bool,
             limit: int) -> bytes:
    """A body the server compressed although datago asked for ``identity``: gzip and
    deflate are inflated (within ``limit``); a range of compressed bytes, or another
    coding, is a ``wrong_content_type`` failure."""
    import zlib
    shown = redact(url)
    if ranged or coding not in ("gzip", "x-gzip", "deflate"):
        what = "a Range request answered with" if ranged else "a body sent with"
        raise FetchError(f"{shown}: {what} Content-Encoding {coding[:40]!r} (datago asks for "
                         f"identity and does not decode it)", "wrong_content_type", shown,
                         status)
    wbits = 16 + zlib.MAX_WBITS if coding != "deflate" else (
        zlib.MAX_WBITS if data[:1] == b"\x78" else -zlib.MAX_WBITS)
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise FetchError(f"{shown}: a {coding} body that does not inflate ({e})",
                         "wrong_content_type", shown, status) from None
    if len(out) > limit:
        raise _over_limit(url, status, None, limit, None, None)
    if not d.eof:
        raise _Retry("truncated", f"a {coding} body that ends early", status)
    return out


def _over_limit(loc: str, status: Optional[int], length: Optional[str], limit: int,
                offset: Optional[int], size: Optional[int]) -> FetchError:
    """The error of a body over the fetch layer's bound (``_attempt``, ``_local``)."""
    shown = redact(loc)
    total = (f"{int(length):,} bytes" if length and length.strip().isdigit()
             else f"more than {limit:,} bytes")
    if offset is not None and status == 200:
        return FetchError(
            f"{shown}: the server ignored the Range request for bytes {offset}-"
            f"{offset + size - 1} and sent the whole object ({total}); archive members "
            f"are read by offset, so the server must answer Range requests (WebDataset "
            f"shards can also be read whole, once: streaming: true)", "range_ignored", shown,
            status)
    return FetchError(f"{shown}: {total}, over max_object_bytes ({limit:,} bytes), the "
                      f"largest object read whole", "too_large", shown, status)


class Fetcher:
    """Reads locations (see the module docstring).  Thread-safe; one ``httpx``
    client per process, made on first remote use (a forked DataLoader worker makes
    its own)."""

    def __init__(self, config: Optional[FetchConfig] = None, *, sleep=time.sleep):
        self.config = config or FetchConfig()
        self._client = None
        self._transport = None
        self._pid = None
        self._lock = threading.Lock()
        self._sleep = sleep
        self.retried: Dict[str, int] = {}          # retried failures by reason (this process)
        self._s3: Optional[_S3] = None
        self.cache = None
        c = self.config
        if c.cache_dir and c.cache_limit_bytes:
            from datago._diskcache import DiskCache
            self.cache = DiskCache(c.cache_dir, c.cache_limit_bytes)

    def __repr__(self) -> str:
        c = self.config
        return (f"Fetcher(io_concurrency={c.io_concurrency}, timeout_s={c.timeout_s}, "
                f"retries={c.retries})")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        state["_transport"] = None
        state["_pid"] = None
        state["_lock"] = None
        state["_s3"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def read(self, loc: Location, cache: bool = True) -> bytes:
        """The bytes at ``loc``; ``FetchError`` when they cannot be had.  ``cache``:
        may come from / go to the disk cache (not for files that change, like indexes)."""
        if isinstance(loc, Inline):
            return loc.data
        if isinstance(loc, Member):
            if is_remote(loc.url):
                data = self._cached(loc.url, loc.offset, loc.size, cache, loc.total)
            else:
                data = self._local(loc.url, loc.offset, loc.size, loc.total)
            if loc.codec or loc.crc32 >= 0:
                from datago._codecs import decode_member
                return decode_member(loc, data)
            return data
        if is_remote(loc):
            return self._cached(loc, None, None, cache)
        return self._local(loc, None, None)

    def read_optional(self, loc: str) -> Optional[bytes]:
        """The bytes of a file or URL that may not exist (an index next to a shard):
        None when it is missing (a local OSError, an HTTP 4xx, an HTML page or a
        redirect that leads nowhere); other failures raise.  Never cached."""
        if is_remote(loc):
            try:
                return self.read(loc, cache=False)
            except FetchError as e:
                if e.reason in ("http_4xx", "wrong_content_type", "redirect"):
                    return None
                raise
        try:
            with open(loc, "rb") as f:
                return f.read()
        except OSError:
            return None

    def _cached(self, url: str, offset: Optional[int], size: Optional[int],
                use: bool = True, total: int = -1) -> bytes:
        if self.cache is None or not use:
            return self._http(url, offset, size, total=total)
        key = url if offset is None else f"{url}#{offset}+{size}" + (
            f"/{total}" if total >= 0 else "")
        data = self.cache.get(key)
        if data is None or (size is not None and len(data) != size):
            data = self._http(url, offset, size, total=total)
            self.cache.put(key, data)
        return data

    def head(self, loc: Location, whole: bool = False, nbytes: int = 65536) -> bytes:
        """The first ``nbytes`` at ``loc`` (fewer when it is shorter), or all of it."""
        if whole:
            return self.read(loc)
        if isinstance(loc, Member):
            if loc.codec:                    # the content is known only once decoded
                return self.read(loc)[:nbytes]
            return self.read(Member(loc.url, loc.offset, min(loc.size, nbytes), loc.name,
                                    total=loc.total))
        if is_remote(loc):
            return self._http(loc, 0, nbytes, short_ok=True)   # also s3://
        try:
            with open(loc, "rb") as f:
                return f.read(nbytes)
        except OSError as e:
            raise FetchError(f"cannot read {loc}: {e.strerror or e}", "read_error", loc) from None

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None
            self._transport = None

    # ------------------------------------------------------------------ local
    def _local(self, path: str, offset: Optional[int], size: Optional[int],
               total: int = -1) -> bytes:
        if offset is None:
            return read_file(path, self.config.max_object_bytes)
        try:
            with open(path, "rb") as f:
                if total >= 0:
                    _check_total(os.fstat(f.fileno()).st_size, total, path)
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            if isinstance(e, FetchError):
                raise
            raise FetchError(f"cannot read {path}: {e.strerror or e}", "read_error", path) from None
        if len(data) != size:
            raise FetchError(f"{path}: expected {size} bytes at offset {offset}, the file "
                             f"ends after {len(data)}", "truncated", path)
        return data

    # ------------------------------------------------------------------ http
    def _http_client(self):
        pid = os.getpid()
        if self._client is None or self._pid != pid:
            with self._lock:
                if self._client is None or self._pid != pid:
                    import httpx
                    from datago._http import StdlibTransport, env_proxies
                    c = self.config
                    kw = {}
                    self._transport = None
                    if not env_proxies():          # (httpx's own transport handles proxies)
                        self._transport = kw["transport"] = StdlibTransport(
                            timeout=c.timeout_s, verify=c.verify_tls, max_idle=c.io_concurrency)
                    # (redirects and the configured headers: _get)
                    self._client = httpx.Client(
                        limits=httpx.Limits(max_connections=c.io_concurrency,
                                            max_keepalive_connections=c.io_concurrency),
                        timeout=httpx.Timeout(c.timeout_s), follow_redirects=False,
                        verify=c.verify_tls, **kw)
                    self._pid = pid
        return self._client

    @contextlib.contextmanager
    def _get(self, url: str, headers: Dict[str, str], partial: bool = False,
             sign: Optional[Callable] = None):
        """A streamed GET with the configured headers, redirects followed
        (``_redirected``; ``sign``: what signed the request, see ``_prepare``): a
        context manager giving the last ``httpx.Response``.
        With the standard-library transport the request goes to it directly,
        skipping the client's cookie and auth machinery (~0.3 ms per request).
        ``partial``: the body is consumed as it arrives (a stream).  (Whole bodies
        take a shorter way still: ``_attempt``.)"""
        import httpx
        client = self._http_client()
        transport = self._transport
        headers = {**self.config.headers, **headers}
        chain = [url]
        while True:
            if transport is not None:
                req = httpx.Request("GET", url, headers=headers,
                                    extensions={"partial_reads": True} if partial else None)
                resp = transport.handle_request(req)
            else:                                    # (environment proxies)
                req = client.build_request("GET", url, headers=headers)
                resp = client.send(req, stream=True)
            location = resp.headers.get("location")
            if resp.status_code not in _REDIRECTS or not location:
                break
            resp.close()
            url, headers = _redirected(str(req.url), resp.status_code, location, headers, chain,
                                       sign)
        try:
            yield resp
        finally:
            resp.close()

    def _http(self, url: str, offset: Optional[int], size: Optional[int],
              short_ok: bool = False, total: int = -1) -> bytes:
        return self._retrying(url, lambda: self._attempt(url, offset, size, short_ok,
                                                         total=total))

    def _retrying(self, url: str, attempt_fn):
        """``attempt_fn()`` until it does not raise ``_Retry``, within the retries and
        the deadline (jittered exponential backoff, ``Retry-After`` honoured)."""
        t0 = time.monotonic()
        attempt = 0
        while True:
            try:
                return attempt_fn()
            except _Retry as r:
                attempt += 1
                self._backoff(r, attempt, time.monotonic() - t0, redact(url))

    def _backoff(self, r: "_Retry", attempt: int, elapsed: float, shown: str) -> None:
        """Sleep before retry number ``attempt``, or raise ``FetchError`` when the
        retries or the deadline are spent."""
        c = self.config
        wait = min(c.backoff_max_s, c.backoff_s * 2 ** (attempt - 1)) * random.random()
        if r.wait is not None:
            wait = max(wait, min(r.wait, c.backoff_max_s))
        if attempt > c.retries or elapsed + wait >= c.deadline_s:
            why = "retries" if attempt > c.retries else f"the {c.deadline_s:g} s deadline"
            raise FetchError(f"{shown}: {r} (gave up after {attempt} attempts: {why})",
                             r.reason, shown, r.status, attempt) from None
        with self._lock:
            self.retried[r.reason] = self.retried.get(r.reason, 0) + 1
        self._sleep(wait)

    def prepare(self, url: str, headers: Dict[str, str]):
        """(URL to request, headers) for a location: ``s3://`` becomes a signed HTTPS
        request (signed per attempt: the signature carries the time)."""
        return self._prepare(url, headers)[:2]

    def _prepare(self, url: str, headers: Dict[str, str]) -> Tuple[str, Dict[str, str],
                                                                   Optional[Callable]]:
        """``prepare``'s (URL, headers) and what signed them (``_S3.sign``, which
        signs a redirect's follow-up again: ``_redirected``), or None."""
        if not url.startswith("s3://"):
            return url, headers, None
        if self._s3 is None:
            self._s3 = _S3()
        target = self._s3.url(url)
        return target, self._s3.sign(target, headers), self._s3.sign

    def _check(self, resp, url: str) -> None:
        """Raise ``_Retry`` / ``FetchError`` for a response that carries no data."""
        status = resp.status_code
        if status >= 500:
            raise _Retry("http_5xx", f"HTTP {status}", status)
        if status == 429:
            raise _Retry("http_429", "HTTP 429 Too Many Requests", status,
                         _retry_after(resp.headers.get("retry-after")))
        if status >= 400:
            raise FetchError((status == 400 and self._wrong_region(resp, url))
                             or f"{redact(url)}: HTTP {status}", "http_4xx", redact(url), status)
        if status >= 300:                     # (the ones with a Location are followed)
            raise FetchError(self._wrong_region(resp, url)
                             or f"{redact(url)}: HTTP {status} without a Location to follow",
                             "redirect", redact(url), status)
        ctype = resp.headers.get("content-type", "").lower()
        if ctype.startswith("text/html"):
            raise FetchError(f"{redact(url)}: got an HTML page ({ctype}), not data",
                             "wrong_content_type", redact(url), status)

    def _wrong_region(self, resp, url: str) -> Optional[str]:
        """What to say of S3's refusal of an ``s3://`` request signed for another
        region than the bucket's (a 301 PermanentRedirect without a Location, a 400
        AuthorizationHeaderMalformed or IllegalLocationConstraint), which names the
        bucket's region in ``x-amz-bucket-region``; None for any other response."""
        if self._s3 is None or not url.startswith("s3://"):
            return None
        region = (resp.headers.get("x-amz-bucket-region") or "").strip()
        if not _REGION.fullmatch(region) or region == self._s3.region:
            return None
        return (f"{redact(url)}: the bucket is in region {region}, not {self._s3.region} "
                f"(set AWS_REGION={region})")

    @staticmethod
    def _transport_failure(e: Exception) -> "_Retry":
        """The retryable failure an httpx transport error stands for."""
        import httpx
        if isinstance(e, httpx.TimeoutException):
            return _Retry("timeout", f"timed out ({type(e).__name__})")
        if isinstance(e, httpx.RemoteProtocolError):
            text = str(e)
            reason = "truncated" if "complete message body" in text else "reset"
            return _Retry(reason, text.split("(")[0].strip() or reason)
        if isinstance(e, httpx.ConnectError):
            return _Retry("connect", f"cannot connect: {_short(e)}")
        return _Retry("reset", f"connection error: {_short(e)}")

    def get(self, url: str, headers: Optional[Dict[str, str]] = None) -> bytes:
        """The body of a GET of ``url`` with extra ``headers`` (sent to this URL only:
        an API token, say), under the retry policy; never cached."""
        return self._retrying(url, lambda: self._attempt(url, None, None, headers=headers))

    def _attempt(self, url: str, offset: Optional[int], size: Optional[int],
                 short_ok: bool = False, headers: Optional[Dict[str, str]] = None,
                 total: int = -1) -> bytes:
        import httpx
        headers = dict(headers) if headers else {}
        limit = self.config.max_object_bytes
        if offset is not None:
            headers["Range"] = f"bytes={offset}-{offset + size - 1}"
            if not short_ok:                  # (a header probe reads what the sample will)
                limit = max(size, min(limit, RANGE_WHOLE_LIMIT))
        target, headers, sign = self._prepare(url, headers)
        try:
            self._http_client()
            if self._transport is not None and _plain_url(target):
                headers = {**self.config.headers, **headers}
                chain = [target]
                while True:
                    status, head, data = self._transport.get(target, headers, limit)
                    if status not in _REDIRECTS or not head.get("location"):
                        break
                    target, headers = _redirected(target, status, head["location"], headers,
                                                  chain, sign)
                if status == 416 and short_ok:
                    return b""
                self._check(_Head(status, head), url)
            else:
                with self._get(target, headers, sign=sign) as resp:
                    status, head = resp.status_code, resp.headers
                    if status == 416 and short_ok:
                        return b""                    # an empty object
                    self._check(resp, url)
                    data = _read_at_most(resp, limit)
        except httpx.TransportError as e:
            raise self._transport_failure(e) from None
        if data is None:
            raise _over_limit(url, status, head.get("content-length"), limit,
                              None if short_ok else offset, size)
        coding = (head.get("content-encoding") or "identity").strip().lower()
        if coding != "identity":
            data = _decoded(data, coding, url, status, offset is not None, limit)
        if offset is not None and status == 206:
            _check_range(head.get("content-range"), url, offset, size, short_ok, total)
        elif offset is not None and total >= 0:         # (the whole object, Range ignored)
            _check_total(len(data), total, url)
        return self._sized(data, status, offset, size, short_ok)

    @staticmethod
    def _sized(data: bytes, status: int, offset: Optional[int], size: Optional[int],
               short_ok: bool) -> bytes:
        """The requested range of a body (cut here when the server ignored Range)."""
        if offset is not None:
            if status == 200:                 # the server ignored Range: cut it ourselves
                data = data[offset:offset + size]
            if len(data) != size and not (short_ok and len(data) < size):
                raise _Retry("truncated", f"expected {size} bytes, got {len(data)}", status)
        return data

    # ------------------------------------------------------------------ streams
    def size(self, loc: str) -> int:
        """The size in bytes of a file or object (a one-byte ranged GET for URLs)."""
        if not is_remote(loc):
            try:
                return os.path.getsize(loc)
            except OSError as e:
                raise FetchError(f"cannot read {loc}: {e.strerror or e}", "read_error",
                                 loc) from None

        def attempt() -> int:
            import httpx
            target, headers, sign = self._prepare(loc, {"Range": "bytes=0-0"})
            try:
                with self._get(target, headers, sign=sign) as resp:
                    if resp.status_code == 416:
                        return 0
                    self._check(resp, loc)
                    total = resp.headers.get("content-range", "").rpartition("/")[2]
                    if resp.status_code == 206 and total.isdigit():
                        resp.read()            # (its byte: the connection stays reusable)
                        return int(total)
                    length = resp.headers.get("content-length", "")
                    if resp.status_code == 200 and length.isdigit():
                        return int(length)
            except httpx.TransportError as e:
                raise self._transport_failure(e) from None
            raise FetchError(f"{redact(loc)}: the server gives no size", "read_error", redact(loc))

        return self._retrying(loc, attempt)

    def stream(self, loc: str, chunk_size: int = 1 << 20, cache: bool = True) -> Iterator[bytes]:
        """The bytes of a file or object as chunks, never all in memory.  A remote
        stream that breaks (reset, truncated, timeout, 5xx) is resumed where it
        stopped with a ``Range`` request (or by skipping what was already read when
        the server ignores ranges), under the retry policy; the retry count starts
        over whenever data arrived, and ``deadline_s`` does not apply (a shard may
        take long).  ``FetchError`` when it cannot be completed.  With the disk
        cache, a remote object is read from it when there, else written to it as
        it streams by (kept only when the stream completes)."""
        if cache and self.cache is not None and is_remote(loc):
            f = self.cache.open(loc)
            if f is not None:
                with f:
                    while True:
                        data = f.read(chunk_size)
                        if not data:
                            return
                        yield data
            with self.cache.writer(loc) as w:
                for data in self.stream(loc, chunk_size, cache=False):
                    w.write(data)
                    yield data
            return
        if not is_remote(loc):
            try:
                with open(loc, "rb") as f:
                    while True:
                        data = f.read(chunk_size)
                        if not data:
                            return
                        yield data
            except OSError as e:
                raise FetchError(f"cannot read {loc}: {e.strerror or e}", "read_error",
                                 loc) from None
        import httpx
        shown = redact(loc)
        pos, attempt = 0, 0
        while True:
            got = 0
            try:
                headers = {"Accept-Encoding": "identity"}
                if pos:
                    headers["Range"] = f"bytes={pos}-"
                target, headers, sign = self._prepare(loc, headers)
                with self._get(target, headers, partial=True, sign=sign) as resp:
                    if resp.status_code == 416 and pos:
                        return                        # it ended exactly where it broke
                    self._check(resp, loc)
                    if pos and resp.status_code == 206:
                        m = _CONTENT_RANGE.fullmatch(
                            resp.headers.get("content-range", "").strip())
                        if m is None or int(m[1]) != pos:
                            raise FetchError(
                                f"{shown}: resumed from byte {pos}, the server sent "
                                f"Content-Range {resp.headers.get('content-range', '(none)')[:80]!r}",
                                "bad_range", shown, 206)
                    skip = pos if resp.status_code == 200 else 0
                    for data in resp.iter_raw():          # as it arrives
                        if skip:
                            cut = min(skip, len(data))
                            data, skip = data[cut:], skip - cut
                            if not data:
                                continue
                        pos += len(data)
                        got += len(data)
                        yield data
                    if skip:
                        raise _Retry("truncated", f"the stream ended before byte {pos}")
                return
            except httpx.TransportError as e:
                r = self._transport_failure(e)
            except _Retry as e:
                r = e
            if got:
                attempt = 0                           # progress: a fresh budget
            attempt += 1
            if pos:
                with self._lock:
                    self.retried["resumed"] = self.retried.get("resumed", 0) + 1
            self._backoff(r, attempt, 0.0, shown)


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) < 200 else text[:197] + "..."
