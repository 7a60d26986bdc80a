"""Real HTTP servers on loopback for tests (no mocks).

* ``Nginx(root_dir)``: a real nginx serving ``root_dir`` statically (Range,
  keep-alive, sendfile) on ``127.0.0.1:<free port>``. Everything it writes (pid,
  logs, temp dirs) lives in its own temp dir, so it runs as root without touching
  /etc, /var or /run.
* ``FaultServer(files)``: our own threaded HTTP/1.1 file server (Range,
  keep-alive, Content-Length) that injects faults from a thread-safe plan:
  ``server.add_fault("*.jpg", "503", times=2)``. It logs every request.
* ``free_port()``: a free TCP port on 127.0.0.1.

Both are context managers; ``close()`` is idempotent, bounded and joins/reaps
everything it started. Use them directly, e.g.::

    with FaultServer({"/a.jpg": data}) as srv:
        srv.add_fault("/a.jpg", "reset")
        httpx.get(srv.url + "/a.jpg")
"""

from __future__ import annotations

import ctypes
import fnmatch
import http.server
import mimetypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

HOST = "127.0.0.1"

__all__ = ["HOST", "free_port", "wait_for_port", "find_nginx", "NginxNotFound", "Nginx",
           "FaultServer", "Fault", "RequestRecord", "FAULT_KINDS", "REDIRECT_KINDS"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll until ``127.0.0.1:port`` accepts a connection (True), ``proc`` exits or
    ``timeout`` passes (False). Bounded: at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------

class NginxNotFound(RuntimeError):
    pass


def find_nginx() -> str:
    """Path of the nginx binary (/usr/sbin/nginx or PATH); NginxNotFound if absent."""
    for cand in ("/usr/sbin/nginx", shutil.which("nginx")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise NginxNotFound("nginx not found (/usr/sbin/nginx or PATH); run scripts/setup.sh "
                        "or: apt-get install -y --no-install-recommends nginx")


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):          # not Linux/glibc: no parent-death signal
    _prctl = None


def _die_with_parent() -> None:            # preexec_fn: runs in the child, keep it tiny
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_MIME = """
    text/html html htm; text/plain txt; application/json json jsonl;
    image/jpeg jpg jpeg; image/png png; image/webp webp; image/gif gif; image/bmp bmp;
    image/tiff tif tiff; application/x-tar tar; application/gzip gz;
    application/zip zip; application/x-parquet parquet;
"""


class Nginx:
    """A real nginx serving ``root_dir`` on ``http://127.0.0.1:<free port>``.

    Single process (``master_process off``) by default, so a SIGKILL can never
    orphan workers; ``master_process=True`` runs a master plus ``workers`` workers
    in their own process group (killed as a group on the hard-stop path). nginx
    also gets PR_SET_PDEATHSIG=SIGKILL, so it dies with the thread that started it
    even if the test process is killed. ``extra_http``/``extra_server`` are raw
    config text appended inside ``http {}`` / ``server {}``. ``log_format``: the
    access log's line format (nginx variables, e.g. ``"$connection $status
    $request_uri"``: ``$connection`` tells which requests shared a connection);
    default nginx's ``combined``.
    """

    def __init__(self, root_dir: str | os.PathLike, *, master_process: bool = False,
                 workers: int = 1, extra_http: str = "", extra_server: str = "",
                 log_format: str = "", start_timeout: float = 10.0):
        if "'" in log_format or "\\" in log_format:
            raise ValueError("log_format: no quotes or backslashes")
        self.root = Path(root_dir).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(self.root)
        self.binary = find_nginx()
        self.master_process = master_process
        self.workers = workers
        self.extra_http = extra_http
        self.extra_server = extra_server
        self.log_format = log_format
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._stderr = None
        self._closed = False

    # paths inside the private temp dir
    @property
    def dir(self) -> Path:
        assert self._tmp is not None, "not started"
        return Path(self._tmp.name)

    @property
    def conf_path(self) -> Path:
        return self.dir / "nginx.conf"

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"http://{HOST}:{self.port}"

    def _conf(self, port: int) -> str:
        d = self.dir
        user = "user root;\n" if os.geteuid() == 0 else ""   # workers must read root-only tmp dirs
        root = str(self.root).replace('"', '\\"')
        log = f"log_format datago '{self.log_format}';\n    " if self.log_format else ""
        return f"""\
daemon off;
master_process {"on" if self.master_process else "off"};
worker_processes {self.workers};
{user}pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    types {{ {_MIME} }}
    default_type application/octet-stream;
    {log}access_log {d}/access.log{" datago" if self.log_format else ""};
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60s;
    keepalive_requests 100000;
    server_tokens off;
    {self.extra_http}
    server {{
        listen {HOST}:{port};
        server_name localhost;
        root "{root}";
        location / {{ autoindex off; }}
        {self.extra_server}
    }}
}}
"""

    def start(self) -> "Nginx":
        if self.proc is not None:
            return self
        if self._closed:
            raise RuntimeError("Nginx was closed")
        self._tmp = tempfile.TemporaryDirectory(prefix="datago-nginx-")
        errors = []
        try:
            for _attempt in range(5):                     # a free port can be taken before nginx binds it
                port = free_port()
                self.conf_path.write_text(self._conf(port))
                err_path = self.dir / "stderr.log"
                self._stderr = open(err_path, "wb")
                # -p: prefix (relative paths); -e stderr: no startup log in /var/log
                self.proc = subprocess.Popen(
                    [self.binary, "-p", str(self.dir) + "/", "-c", str(self.conf_path), "-e", "stderr"],
                    stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                    start_new_session=True, preexec_fn=_die_with_parent)
                if wait_for_port(port, self.start_timeout, self.proc):
                    self.port = port
                    return self
                self._kill()
                err = self._read_logs()
                errors.append(err)
                if "Address already in use" not in err:
                    break
            conf = "\n".join(f"{i:3d} {line}" for i, line in enumerate(self.conf_path.read_text().splitlines(), 1))
            raise RuntimeError(f"nginx failed to start ({self.binary}):\n" + "\n---\n".join(errors)
                               + f"\n[nginx.conf]\n{conf}")
        except BaseException:
            self.close()
            raise

    def _read_logs(self) -> str:
        out = []
        for name in ("stderr.log", "error.log"):
            p = self.dir / name
            if p.exists():
                txt = p.read_text(errors="replace").strip()
                if txt:
                    out.append(f"[{name}]\n{txt}")
        return "\n".join(out) or "(no output)"

    def error_log(self) -> str:
        """nginx's stderr and error.log so far."""
        return self._read_logs()

    def access_log(self, settle_s: float = 0.05) -> list[str]:
        """Lines of the access log (one per completed request).  nginx writes a
        request's line just after the response's last byte, so a client that reads
        the log as soon as it has its response can miss it: the log is read again
        until it has not grown for ``settle_s`` (2 s at most)."""
        p = self.dir / "access.log"

        def read() -> list[str]:
            return p.read_text().splitlines() if p.exists() else []

        lines, deadline = read(), time.monotonic() + 2.0
        while True:
            time.sleep(settle_s)
            again = read()
            if len(again) == len(lines) or time.monotonic() > deadline:
                return again
            lines = again

    def _kill(self) -> None:
        """Stop the process: SIGQUIT (graceful), then SIGKILL to the group; always reaped."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGQUIT)
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        if proc.poll() is None or self.master_process:
            try:
                os.killpg(proc.pid, signal.SIGKILL)      # own session: pgid == pid (workers too)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        """Stop nginx and remove its temp dir. Idempotent."""
        self._closed = True
        try:
            self._kill()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    stop = close

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):                        # last resort; tests should close explicitly
        if getattr(self, "proc", None) is not None:
            try:
                self._kill()
            except Exception:
                pass


# ---------------------------------------------------------------------------
# FaultServer
# ---------------------------------------------------------------------------

REDIRECT_KINDS = frozenset({"301", "302", "303", "307", "308"})
FAULT_KINDS = frozenset({
    "500", "503", "401", "403", "404",  # that status, small text body, connection kept alive
                                 # (``body``: that body instead, ``chunked``: sent chunked)
    *REDIRECT_KINDS,             # that status + Location: <location> (None: no Location),
                                 # small body (or ``body``/``chunked``), connection kept alive
    "429",                       # 429 + Retry-After: <retry_after>
    "reset",                     # headers (full Content-Length) + part of the body, then RST
    "truncate",                  # headers (full Content-Length) + part of the body, then FIN
    "drop",                      # close (FIN) after reading the request, before any response byte
    "stall",                     # wait stall_s before responding (then respond normally)
    "stall_body",                # headers + part of the body, wait stall_s, then the rest
    "wrong_type",                # 200 text/html with an HTML page instead of the file
})


@dataclass
class Fault:
    """One rule of the fault plan. ``remaining`` None = unlimited."""
    pattern: str
    kind: str
    remaining: int | None = 1
    retry_after: int = 0
    stall_s: float = 10.0
    fraction: float = 0.5        # part of the body sent before reset/truncate/stall_body
    hits: int = 0
    after: int = 0               # matching requests let through untouched before this rule applies
    location: str | None = None  # a redirect's Location header
    body: bytes | None = None    # a status or redirect fault's body (None: a short text)
    chunked: bool = False        # that body sent with Transfer-Encoding: chunked


@dataclass
class RequestRecord:
    method: str
    path: str                    # URL path, percent-decoded, without the query
    range: str | None            # the Range header as sent
    time: float                  # time.monotonic() when the request line was read
    fault: str | None            # the fault kind applied, None when served normally
    status: int | None = None    # status sent (None for "drop")
    peer: int = 0                # client port: same value = same (kept-alive) connection
    headers: dict = field(default_factory=dict)


def _parse_range(value: str | None, size: int):
    """None: no/ignored Range (serve 200). 'unsatisfiable': 416. Else (start, end) inclusive."""
    if not value:
        return None
    value = value.strip()
    if not value.startswith("bytes=") or "," in value:      # multi-range: allowed to ignore
        return None
    spec = value[6:].strip()
    if "-" not in spec:
        return None
    a, b = (x.strip() for x in spec.split("-", 1))
    try:
        if a == "":                                          # suffix: last b bytes
            n = int(b)
            if n < 0:
                return None
            if n == 0 or size == 0:
                return "unsatisfiable"
            return max(size - n, 0), size - 1
        start = int(a)
        end = int(b) if b else size - 1
    except ValueError:
        return None
    if start < 0 or (b and end < start):
        return None                                          # syntactically invalid: ignore
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FaultServer/1"
    sys_version = ""
    timeout = 60                 # idle keep-alive bound; close() wakes idle readers anyway
    disable_nagle_algorithm = True   # TCP_NODELAY: headers and body are separate writes
    server: "_HTTPServer"

    def log_message(self, *args):        # quiet
        pass

    def setup(self):
        super().setup()
        self.server.owner._track_conn(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track_conn(self.connection, False)

    # --- responses -------------------------------------------------------
    def send_response(self, code, message=None):
        # the log shows the status before a byte of the response leaves: a client
        # that reads the log as soon as it has its response must find it there
        rec = getattr(self, "_rec", None)
        if rec is not None:
            rec.status = code
        super().send_response(code, message)

    def _simple(self, status: int, body: bytes, ctype="text/plain; charset=utf-8", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _abort(self, rst: bool):
        sock = self.connection
        try:
            if rst:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close_connection = True
        try:
            sock.close()                     # RST (linger 0) or FIN
        except OSError:
            pass

    def do_GET(self):
        self._serve()

    def do_HEAD(self):
        self._serve()

    def _not_allowed(self):
        self.close_connection = True        # we do not read request bodies
        self._simple(405, b"method not allowed\n", extra=[("Allow", "GET, HEAD"), ("Connection", "close")])

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    def _serve(self):
        owner = self.server.owner
        stop = owner._stop
        t = time.monotonic()
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self._query = urllib.parse.urlsplit(self.path).query
        rec = RequestRecord(self.command, path, self.headers.get("Range"), t, None,
                            peer=self.client_address[1], headers=dict(self.headers.items()))
        fault = owner._take_fault(path)
        rec.fault = fault.kind if fault else None
        owner._append_log(rec)
        self._rec = rec
        try:
            if owner.latency_s > 0 and stop.wait(owner.latency_s):
                self._abort(rst=False)
                return
            rec.status = self._respond(path, fault, stop)
        except (ConnectionError, BrokenPipeError, OSError):
            self.close_connection = True     # client went away (e.g. its timeout fired)
        finally:
            self._rec = None

    def _respond(self, path: str, fault: Fault | None, stop: threading.Event):
        kind = fault.kind if fault else None
        if kind == "stall":
            if stop.wait(fault.stall_s):     # cut short at shutdown
                self._abort(rst=False)
                return None
            kind = None
        if kind == "drop":
            self._abort(rst=False)
            return None
        if kind in ("500", "503", "401", "403", "404") or kind in REDIRECT_KINDS:
            status = int(kind)
            body = fault.body if fault.body is not None else f"injected {status}\n".encode()
            extra = [] if fault.location is None or kind not in REDIRECT_KINDS else \
                [("Location", fault.location)]
            if not fault.chunked:
                return self._simple(status, body, extra=extra)
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                for i in range(0, len(body), 4096):
                    piece = body[i:i + 4096]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            return status
        if kind == "429":
            return self._simple(429, b"slow down\n", extra=[("Retry-After", str(fault.retry_after))])
        if kind == "wrong_type":
            html = (b"<!DOCTYPE html><html><head><title>Login required</title></head>"
                    b"<body><h1>Please sign in</h1></body></html>\n")
            return self._simple(200, html, ctype="text/html; charset=utf-8")

        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if self.server.owner.upstream:
            status, ctype, data = self.server.owner._proxy(self, path)
            if status != 200:
                return self._simple(status, data, ctype=ctype)
        else:
            data = self.server.owner._lookup(path)
        if data is None:
            return self._simple(404, b"not found\n")
        size = len(data)
        rng = _parse_range(self.headers.get("Range"), size)
        if rng == "unsatisfiable":
            return self._simple(416, b"range not satisfiable\n", extra=[("Content-Range", f"bytes */{size}")])
        if rng is None:
            status, body, extra = 200, data, []
        else:
            a, b = rng
            status, body = 206, data[a:b + 1]
            extra = [("Content-Range", f"bytes {a}-{b}/{size}")]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return status
        if kind in ("reset", "truncate", "stall_body"):
            n = min(int(len(body) * fault.fraction), max(len(body) - 1, 0))
            self.wfile.write(body[:n])
            if kind == "stall_body":
                if stop.wait(fault.stall_s):
                    self._abort(rst=False)
                    return status
                self.wfile.write(body[n:])
                return status
            self._abort(rst=(kind == "reset"))
            return status
        self.wfile.write(body)
        return status


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True        # we track and join the threads ourselves (bounded)
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, owner: "FaultServer"):
        self.owner = owner
        super().__init__((HOST, 0), _Handler)

    def process_request(self, request, client_address):
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name="FaultServer-conn", daemon=True)
        self.owner._track_thread(t)
        t.start()

    def handle_error(self, request, client_address):   # client disconnects are expected
        pass


class FaultServer:
    """Threaded HTTP/1.1 file server on ``http://127.0.0.1:<free port>`` with injected faults.

    ``files``: a directory, or a mapping of URL path ("/a/b.jpg" or "a/b.jpg") to
    bytes (``server.files`` may be changed while running). Faults: ``add_fault``;
    the first rule whose fnmatch ``pattern`` matches the URL path and has
    ``remaining`` > 0 (or None) is consumed per request. ``latency_s`` delays every
    request. ``log`` lists a ``RequestRecord`` per GET/HEAD request.

    ``upstream="http://127.0.0.1:P"`` (with ``files=None``): a fault-injecting proxy
    instead. Each request is forwarded (path, query, ``Authorization``; ``Host`` set
    to this server's, so absolute URLs the upstream builds -- a ``next`` page, a file
    URL -- point back through the proxy); its status, type and body come back, with
    Range applied here.
    """

    def __init__(self, files: str | os.PathLike | Mapping[str, bytes] | None = None, *,
                 latency_s: float = 0.0, start: bool = True, upstream: str | None = None):
        self.upstream = upstream.rstrip("/") if upstream else None
        if files is None:
            if not upstream:
                raise ValueError("FaultServer needs files or an upstream")
            self.root = None
            self.files = {}
        elif isinstance(files, Mapping):
            self.root: Path | None = None
            self.files: dict[str, bytes] = {("/" + k.lstrip("/")): bytes(v) for k, v in files.items()}
        else:
            self.root = Path(files).resolve()
            if not self.root.is_dir():
                raise NotADirectoryError(self.root)
            self.files = {}
        self.latency_s = latency_s
        self.log: list[RequestRecord] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._closed = False
        if start:
            self.start()

    # --- lifecycle ---------------------------------------------------------
    def start(self) -> "FaultServer":
        if self._httpd is not None:
            return self
        if self._closed:
            raise RuntimeError("FaultServer was closed")
        self._httpd = _HTTPServer(self)
        self.port = self._httpd.server_address[1]
        self._serve_thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                              name="FaultServer-accept", daemon=True)
        self._serve_thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, cut stalls/latency short, close every connection, join all
        threads (bounded by ``timeout``; RuntimeError if a thread is still alive). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()                          # accept loop exits (poll 0.05 s)
        httpd.server_close()                      # listening socket
        with self._lock:
            conns = list(self._conns)
        for c in conns:                           # wake handlers blocked reading keep-alive requests
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        self._serve_thread.join(max(deadline - time.monotonic(), 0))
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0))
        alive = [t for t in threads + [self._serve_thread] if t.is_alive()]
        if alive:
            raise RuntimeError(f"FaultServer.close: {len(alive)} thread(s) still alive after {timeout}s")

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- fault plan --------------------------------------------------------
    def add_fault(self, pattern: str, kind: str | int, times: int | None = 1, *, retry_after: int = 0,
                  stall_s: float = 10.0, fraction: float = 0.5, after: int = 0,
                  location: str | None = None, body: bytes | None = None,
                  chunked: bool = False) -> Fault:
        """Inject ``kind`` into the next ``times`` requests (None: all) whose path matches
        ``pattern`` (fnmatch on the URL path, e.g. "*.jpg", "/shard-0001.tar"), once
        ``after`` matching requests have gone through untouched.  A redirect kind
        ("302", ...) sends ``location`` as its Location header (None: none); a status
        or redirect kind sends ``body`` (default: a short text), ``chunked`` or with a
        Content-Length."""
        kind = str(kind)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(FAULT_KINDS)}")
        if location is not None and kind not in REDIRECT_KINDS:
            raise ValueError(f"location is for the redirect kinds, not {kind!r}")
        if not 0 <= stall_s <= 120:
            raise ValueError("stall_s must be in [0, 120]")
        if not 0 <= fraction < 1:
            raise ValueError("fraction must be in [0, 1)")
        f = Fault(pattern, kind, times, int(retry_after), float(stall_s), float(fraction),
                  after=int(after), location=location,
                  body=None if body is None else bytes(body), chunked=bool(chunked))
        with self._lock:
            self._faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending_faults(self) -> list[Fault]:
        """Rules with uses left (copies)."""
        with self._lock:
            return [Fault(**vars(f)) for f in self._faults if f.remaining is None or f.remaining > 0]

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if (f.remaining is None or f.remaining > 0) and fnmatch.fnmatchcase(path, f.pattern):
                    if f.after > 0:
                        f.after -= 1
                        continue
                    if f.remaining is not None:
                        f.remaining -= 1
                    f.hits += 1
                    return f
        return None

    # --- log ---------------------------------------------------------------
    def _append_log(self, rec: RequestRecord) -> None:
        with self._lock:
            self.log.append(rec)

    def requests(self, pattern: str = "*") -> list[RequestRecord]:
        """Snapshot of the log, filtered by fnmatch on the path."""
        with self._lock:
            return [r for r in self.log if fnmatch.fnmatchcase(r.path, pattern)]

    # --- content -----------------------------------------------------------
    def _lookup(self, path: str) -> bytes | None:
        if self.root is None:
            with self._lock:
                return self.files.get(path)
        rel = path.lstrip("/")
        if not rel:
            return None
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:        # no escaping the root
            return None
        try:
            return p.read_bytes() if p.is_file() else None
        except OSError:
            return None

    def _proxy(self, handler: "_Handler", path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of the request forwarded to the upstream."""
        import http.client
        up = urllib.parse.urlsplit(self.upstream)
        target = urllib.parse.quote(path) + (f"?{handler._query}" if handler._query else "")
        headers = {"Host": f"{HOST}:{self.port}"}
        if handler.headers.get("Authorization"):
            headers["Authorization"] = handler.headers["Authorization"]
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        try:
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            return (resp.status, resp.getheader("Content-Type", "application/octet-stream"),
                    resp.read())
        finally:
            conn.close()

    # --- bookkeeping -------------------------------------------------------
    def _track_thread(self, t: threading.Thread) -> None:
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _track_conn(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(sock)
                if self._stop.is_set():              # raced with close(): do not serve
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            else:
                self._conns.discard(sock)


class MotoS3:
    """moto's S3-compatible server on a free loopback port (``python -m moto.server``),
    with dummy credentials; ``env`` holds the AWS_* variables that point a client at it."""

    def __init__(self, start_timeout: float = 30.0):
        import subprocess
        import sys
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST,
                                      "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for_port(self.port, timeout=start_timeout, proc=self.proc):
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            self.close()
            raise RuntimeError(f"moto server did not start on port {self.port}: {err[-2000:]}")
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_REGION": "us-east-1"}

    def client(self):
        import botocore.session
        s = botocore.session.get_session()
        return s.create_client("s3", endpoint_url=self.url, region_name="us-east-1",
                               aws_access_key_id="testing",
                               aws_secret_access_key="testing-secret")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# datago serve
# ---------------------------------------------------------------------------

class DatagoServe:
    """``python -m datago serve`` on ``127.0.0.1:<free port>``: a folder ``root`` or,
    with ``config``, a datago config file (``root`` then unused, may be None).

    ``token``/``source``/``cache_dir`` become ``--token``/``--source``/``--cache-dir``
    (no token: ``DATAGO_SERVE_TOKEN`` is removed from its environment, so it runs
    open); ``extra_args`` are appended.  Its stdout and stderr go to files
    (``stdout_text()``, ``stderr_text()``).  ``start()`` waits until the port
    accepts connections and raises with the server's stderr if it exits first.
    """

    def __init__(self, root, *, token=None, source=None, config=None, extra_args=(),
                 cache_dir=None, start_timeout: float = 90.0):
        self.root = None if root is None else str(root)
        self.token = token
        self.source = source
        self.config = None if config is None else str(config)
        self.extra_args = list(extra_args)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    def _args(self, port: int) -> list:
        import sys
        args = [sys.executable, "-m", "datago", "serve"]
        if self.config is not None:
            args += ["--config", self.config]
        else:
            args.append(self.root)
        args += ["--host", HOST, "--port", str(port)]
        if self.token is not None:
            args += ["--token", self.token]
        if self.source is not None:
            args += ["--source", self.source]
        if self.cache_dir is not None:
            args += ["--cache-dir", self.cache_dir]
        return args + self.extra_args

    def stdout_text(self) -> str:
        p = Path(self._tmp.name) / "stdout.log" if self._tmp else None
        return p.read_text(errors="replace") if p and p.exists() else ""

    def stderr_text(self) -> str:
        p = Path(self._tmp.name) / "stderr.log" if self._tmp else None
        return p.read_text(errors="replace") if p and p.exists() else ""

    def launch(self) -> "DatagoServe":
        """Start the process without waiting (``wait()`` next).  Call it from a thread
        that outlives the server: the server gets SIGKILL when its starting thread
        ends (PR_SET_PDEATHSIG)."""
        if self.proc is not None:
            return self
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="datago-serve-")
        env = dict(os.environ)
        env.pop("DATAGO_SERVE_TOKEN", None)
        self._port = free_port()
        d = Path(self._tmp.name)
        with open(d / "stdout.log", "wb") as out, open(d / "stderr.log", "wb") as errf:
            self.proc = subprocess.Popen(self._args(self._port), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=errf, env=env,
                                         preexec_fn=_die_with_parent)
        return self

    def wait(self) -> "DatagoServe":
        """Wait until the launched server accepts connections (relaunching it on
        another port if its port was taken); raises with its stderr if it exits."""
        err = ""
        try:
            for attempt in range(3):             # a free port can be taken before it binds
                if attempt:
                    self.launch()
                if wait_for_port(self._port, self.start_timeout, self.proc):
                    self.port = self._port
                    return self
                self._stop()
                err = self.stderr_text()
                if "cannot listen" not in err:
                    break
            raise RuntimeError(f"datago serve did not start:\n{err[-4000:] or '(no output)'}")
        except BaseException:
            self.close()
            raise

    def start(self) -> "DatagoServe":
        if self.port is not None:
            return self
        return self.launch().wait()

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def close(self) -> None:
        """Stop the server (terminate, then kill) and remove its logs. Idempotent."""
        try:
            self._stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> "DatagoServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
