"""The loopback test servers themselves (tests/servers.py): real nginx and our
FaultServer, exercised with httpx and the standard library. What httpx raises for
each fault is pinned here, since the retry classifier relies on it."""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import socket
import threading
import time

import httpx
import pytest

from servers import HOST, FAULT_KINDS, FaultServer, Nginx, free_port

RNG_DATA = os.urandom(300_000)          # content does not matter, identity does
SMALL = b"0123456789" * 100


def _refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def root(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a b.jpg").write_bytes(RNG_DATA)
    (tmp_path / "small.txt").write_bytes(SMALL)
    (tmp_path / "empty.bin").write_bytes(b"")
    return tmp_path


@pytest.fixture
def nginx(root):
    srv = Nginx(root).start()
    yield srv
    srv.close()


@pytest.fixture
def fsrv():
    srv = FaultServer({"/sub/a b.jpg": RNG_DATA, "/small.txt": SMALL, "/x.png": SMALL, "/empty.bin": b""})
    yield srv
    srv.close()


@pytest.fixture
def client():
    with httpx.Client(timeout=10) as c:
        yield c


def test_free_port():
    p = free_port()
    assert 1024 <= p < 65536
    with socket.socket() as s:
        s.bind((HOST, p))                      # it really is free


# --------------------------------------------------------------------------- nginx

def test_nginx_serves_byte_exact(nginx, client, root):
    assert nginx.url == f"http://127.0.0.1:{nginx.port}"
    r = client.get(nginx.url + "/sub/a%20b.jpg")
    assert r.status_code == 200
    assert r.content == RNG_DATA
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["accept-ranges"] == "bytes"
    assert client.get(nginx.url + "/small.txt").content == SMALL
    assert client.get(nginx.url + "/empty.bin").content == b""
    assert client.get(nginx.url + "/missing.jpg").status_code == 404
    assert len(nginx.access_log()) == 4


def test_nginx_range(nginx, client):
    url = nginx.url + "/sub/a%20b.jpg"
    n = len(RNG_DATA)
    r = client.get(url, headers={"Range": "bytes=1000-1999"})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 1000-1999/{n}"
    assert r.content == RNG_DATA[1000:2000]
    r = client.get(url, headers={"Range": "bytes=-100"})
    assert (r.status_code, r.content) == (206, RNG_DATA[-100:])
    r = client.get(url, headers={"Range": f"bytes={n - 10}-"})
    assert (r.status_code, r.content) == (206, RNG_DATA[-10:])
    r = client.get(url, headers={"Range": f"bytes={n}-"})
    assert r.status_code == 416


def test_nginx_keep_alive(nginx):
    conn = http.client.HTTPConnection(HOST, nginx.port, timeout=10)
    try:
        for _ in range(3):                     # three requests on one connection
            conn.request("GET", "/small.txt")
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, SMALL)
            assert not r.will_close
    finally:
        conn.close()


def test_nginx_close_reaps_and_frees_port(root):
    srv = Nginx(root, master_process=True, workers=2)
    with srv:
        assert httpx.get(srv.url + "/small.txt", timeout=10).content == SMALL
        pid, port, tmp = srv.proc.pid, srv.port, srv.dir
    assert srv.proc is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)                      # master and workers gone (own process group)
    assert _refused(port)
    assert not tmp.exists()
    srv.close()                                # idempotent


def test_nginx_start_failure_reports_stderr(root):
    with pytest.raises(RuntimeError, match='unknown directive "bogus_directive"'):
        Nginx(root, extra_server="bogus_directive on;").start()
    with pytest.raises(NotADirectoryError):
        Nginx(root / "nope")


# --------------------------------------------------------------------------- FaultServer: serving

def test_fault_server_serves_and_ranges(fsrv, client):
    u = fsrv.url
    assert u == f"http://127.0.0.1:{fsrv.port}"
    r = client.get(u + "/sub/a%20b.jpg")
    assert (r.status_code, r.content) == (200, RNG_DATA)
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["content-length"] == str(len(RNG_DATA))
    n = len(RNG_DATA)
    r = client.get(u + "/sub/a%20b.jpg", headers={"Range": "bytes=10-19"})
    assert (r.status_code, r.content, r.headers["content-range"]) == (206, RNG_DATA[10:20], f"bytes 10-19/{n}")
    r = client.get(u + "/sub/a%20b.jpg", headers={"Range": f"bytes={n - 5}-{n + 100}"})    # end clamped
    assert (r.status_code, r.content) == (206, RNG_DATA[-5:])
    r = client.get(u + "/sub/a%20b.jpg", headers={"Range": "bytes=-7"})
    assert (r.status_code, r.content) == (206, RNG_DATA[-7:])
    r = client.get(u + "/sub/a%20b.jpg", headers={"Range": f"bytes={n}-"})
    assert (r.status_code, r.headers["content-range"]) == (416, f"bytes */{n}")
    assert client.get(u + "/empty.bin", headers={"Range": "bytes=0-"}).status_code == 416
    r = client.get(u + "/small.txt", headers={"Range": "bytes=0-1,5-6"})      # multi-range: ignored
    assert (r.status_code, r.content) == (200, SMALL)
    r = client.head(u + "/small.txt")
    assert (r.status_code, r.headers["content-length"], r.content) == (200, str(len(SMALL)), b"")
    assert client.get(u + "/missing").status_code == 404
    assert client.get(u + "/empty.bin").content == b""
    assert client.post(u + "/small.txt", content=b"x").status_code == 405


def test_fault_server_directory_and_no_escape(root):
    (root.parent / "secret.txt").write_bytes(b"secret")
    with FaultServer(root) as srv, httpx.Client(timeout=10) as c:
        assert c.get(srv.url + "/sub/a%20b.jpg").content == RNG_DATA
        (root / "late.txt").write_bytes(b"late")                  # read per request
        assert c.get(srv.url + "/late.txt").content == b"late"
        conn = http.client.HTTPConnection(HOST, srv.port, timeout=10)
        try:
            conn.request("GET", "/%2e%2e/secret.txt")              # raw path, not normalised
            r = conn.getresponse()
            assert (r.status, r.read()) == (404, b"not found\n")
        finally:
            conn.close()


def test_fault_server_keep_alive_and_log(fsrv, client):
    for _ in range(3):
        client.get(fsrv.url + "/small.txt", headers={"Range": "bytes=0-3"})
    client.head(fsrv.url + "/x.png")
    log = fsrv.requests()
    assert [(r.method, r.path, r.range, r.fault, r.status) for r in log] == \
        [("GET", "/small.txt", "bytes=0-3", None, 206)] * 3 + [("HEAD", "/x.png", None, None, 200)]
    assert len({r.peer for r in log}) == 1                        # one kept-alive connection
    assert all(a.time <= b.time for a, b in zip(log, log[1:]))
    assert fsrv.requests("*.png") == log[3:]


def test_fault_server_concurrent(fsrv):
    with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=16)) as c:
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            bodies = list(ex.map(lambda i: c.get(fsrv.url + "/sub/a%20b.jpg").content, range(64)))
    assert all(b == RNG_DATA for b in bodies)
    assert len(fsrv.log) == 64


# --------------------------------------------------------------------------- FaultServer: faults

def test_fault_503_twice_then_success(fsrv, client):
    fsrv.add_fault("*.jpg", "503", times=2)
    url = fsrv.url + "/sub/a%20b.jpg"
    assert client.get(fsrv.url + "/small.txt").status_code == 200          # pattern does not match
    rs = [client.get(url) for _ in range(3)]
    assert [r.status_code for r in rs] == [503, 503, 200]
    assert rs[2].content == RNG_DATA
    assert [r.fault for r in fsrv.requests("*.jpg")] == ["503", "503", None]
    assert len({r.peer for r in fsrv.log}) == 1                            # error replies keep the connection
    assert fsrv.pending_faults() == []


@pytest.mark.parametrize("kind", ["500", "403", "404"])
def test_fault_status(fsrv, client, kind):
    fsrv.add_fault("/small.txt", kind)
    r = client.get(fsrv.url + "/small.txt")
    assert r.status_code == int(kind)
    assert r.content == f"injected {kind}\n".encode()
    assert client.get(fsrv.url + "/small.txt").content == SMALL


def test_fault_redirect_and_error_bodies(fsrv, client):
    """Redirect kinds send their Location (none when not given); a status or
    redirect fault's body can be given, and sent chunked; the connection stays."""
    fsrv.add_fault("/old", "307", location="/small.txt")
    fsrv.add_fault("/nowhere", "302")
    fsrv.add_fault("/small.txt", "503", body=b"z" * 10000, chunked=True)
    r = client.get(fsrv.url + "/old")
    assert (r.status_code, r.headers["location"]) == (307, "/small.txt")
    assert r.content == b"injected 307\n" and r.headers["content-length"] == "13"
    r = client.get(fsrv.url + "/nowhere")
    assert r.status_code == 302 and "location" not in r.headers
    r = client.get(fsrv.url + "/small.txt")
    assert r.status_code == 503 and r.headers["transfer-encoding"] == "chunked"
    assert r.content == b"z" * 10000
    assert client.get(fsrv.url + "/small.txt").content == SMALL
    assert len({rec.peer for rec in fsrv.log}) == 1
    with pytest.raises(ValueError):
        fsrv.add_fault("*", "404", location="/x")


def test_nginx_log_format(root):
    """``log_format``: the access log's lines in that format ($connection tells
    which requests shared a connection)."""
    with Nginx(root, log_format="$connection $status $request_uri") as n, \
            httpx.Client(timeout=10) as c:
        assert c.get(n.url + "/small.txt").content == SMALL
        assert c.get(n.url + "/nope").status_code == 404
        (c1, s1, u1), (c2, s2, u2) = (line.split() for line in n.access_log())
    assert (s1, u1, s2, u2) == ("200", "/small.txt", "404", "/nope") and c1 == c2


def test_fault_429_retry_after(fsrv, client):
    fsrv.add_fault("*", "429")
    fsrv.add_fault("*", 429, retry_after=7)
    r1, r2, r3 = (client.get(fsrv.url + "/small.txt") for _ in range(3))
    assert (r1.status_code, r1.headers["retry-after"]) == (429, "0")
    assert (r2.status_code, r2.headers["retry-after"]) == (429, "7")
    assert r3.status_code == 200


def test_fault_unlimited_and_clear(fsrv, client):
    fsrv.add_fault("*.png", "500", times=None)
    assert [client.get(fsrv.url + "/x.png").status_code for _ in range(4)] == [500] * 4
    fsrv.clear_faults()
    assert client.get(fsrv.url + "/x.png").status_code == 200
    with pytest.raises(ValueError):
        fsrv.add_fault("*", "teapot")


def test_fault_reset_is_read_error(fsrv, client):
    fsrv.add_fault("*.jpg", "reset")
    with pytest.raises(httpx.ReadError, match="Connection reset by peer"):
        client.get(fsrv.url + "/sub/a%20b.jpg")
    assert fsrv.log[-1].fault == "reset"
    assert client.get(fsrv.url + "/sub/a%20b.jpg").content == RNG_DATA       # pool recovers


def test_fault_reset_streaming(fsrv, client):
    fsrv.add_fault("*.jpg", "reset", fraction=0.5)
    got = 0
    with pytest.raises(httpx.ReadError):
        with client.stream("GET", fsrv.url + "/sub/a%20b.jpg") as r:
            assert r.status_code == 200                                    # headers arrived first
            for chunk in r.iter_raw():
                got += len(chunk)
    assert got < len(RNG_DATA)             # some prefix (RST discards what was still in flight)


def test_fault_truncate_is_remote_protocol_error(fsrv, client):
    fsrv.add_fault("*.jpg", "truncate", fraction=0.25)
    n = len(RNG_DATA)
    with pytest.raises(httpx.RemoteProtocolError,
                       match=rf"peer closed connection without sending complete message body "
                             rf"\(received {int(n * 0.25)} bytes, expected {n}\)"):
        client.get(fsrv.url + "/sub/a%20b.jpg")
    assert client.get(fsrv.url + "/sub/a%20b.jpg").content == RNG_DATA


def test_fault_drop_is_remote_protocol_error(fsrv, client):
    fsrv.add_fault("*.jpg", "drop")
    with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected without sending a response"):
        client.get(fsrv.url + "/sub/a%20b.jpg")
    assert fsrv.log[-1].status is None


def test_fault_stall_read_timeout(fsrv, client):
    fsrv.add_fault("*.jpg", "stall", stall_s=30)
    with pytest.raises(httpx.ReadTimeout):
        client.get(fsrv.url + "/sub/a%20b.jpg", timeout=httpx.Timeout(10, read=0.2))
    # a short stall, then the file
    fsrv.add_fault("*.jpg", "stall", stall_s=0.05)
    assert client.get(fsrv.url + "/sub/a%20b.jpg").content == RNG_DATA


def test_fault_stall_body_read_timeout(fsrv, client):
    fsrv.add_fault("*.jpg", "stall_body", stall_s=30)
    got = 0
    with pytest.raises(httpx.ReadTimeout):
        with client.stream("GET", fsrv.url + "/sub/a%20b.jpg", timeout=httpx.Timeout(10, read=0.2)) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw():
                got += len(chunk)
    assert got == len(RNG_DATA) // 2


def test_fault_wrong_type(fsrv, client):
    fsrv.add_fault("*.jpg", "wrong_type")
    r = client.get(fsrv.url + "/sub/a%20b.jpg")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.content.startswith(b"<!DOCTYPE html>")
    assert client.get(fsrv.url + "/sub/a%20b.jpg").headers["content-type"] == "image/jpeg"


def test_latency_applies(fsrv, client):
    fsrv.latency_s = 30
    with pytest.raises(httpx.ReadTimeout):
        client.get(fsrv.url + "/small.txt", timeout=httpx.Timeout(10, read=0.2))
    fsrv.latency_s = 0.01
    assert client.get(fsrv.url + "/small.txt").content == SMALL
    assert [r.path for r in fsrv.log] == ["/small.txt", "/small.txt"]


def test_close_with_stall_in_flight():
    srv = FaultServer({"/a": SMALL})
    srv.add_fault("/a", "stall", stall_s=120)
    idle = socket.create_connection((HOST, srv.port))              # an idle keep-alive connection too
    errors = []

    def fetch():
        try:
            httpx.get(srv.url + "/a", timeout=60)
        except httpx.HTTPError as e:
            errors.append(e)

    t = threading.Thread(target=fetch)
    t.start()
    for _ in range(1000):                  # bounded wait for the request to arrive
        if srv.log or not t.is_alive():
            break
        time.sleep(0.01)
    assert srv.log and srv.log[0].fault == "stall"
    # close() raises if any server thread is still alive after its (generous) bound:
    # the stall is cut short by the stop event, the idle connection by a socket shutdown.
    srv.close(timeout=10)
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], httpx.RemoteProtocolError)
    assert idle.recv(1) == b""
    idle.close()
    assert _refused(srv.port)
    srv.close()                            # idempotent
    with pytest.raises(RuntimeError):
        srv.start()


def test_fault_kinds_documented():
    assert {"500", "503", "429", "reset", "truncate", "stall", "wrong_type", "403", "404"} <= FAULT_KINDS
