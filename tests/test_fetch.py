"""The fetch layer against real servers on loopback: nginx for plain files and
ranges, the project's fault-injecting server for every failure it classifies."""

from __future__ import annotations

import os
import time

import pytest

from datago.fetch import FetchConfig, FetchError, Fetcher, Member, redact
from servers import FaultServer, Nginx

BODY = bytes(range(256)) * 64          # 16 KiB


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch")
    (root / "a.bin").write_bytes(BODY)
    (root / "sub").mkdir()
    (root / "sub" / "b.bin").write_bytes(BODY[:1000])
    return root


@pytest.fixture(scope="module")
def nginx(files):
    with Nginx(files) as n:
        yield n


def fast(**kw) -> Fetcher:
    """A fetcher whose retries do not sleep (the waits are recorded instead)."""
    waits = []
    cfg = FetchConfig(**{"timeout_s": 2.0, "retries": 4, **kw})
    f = Fetcher(cfg, sleep=waits.append)
    f.waits = waits
    return f


def test_local_file_and_range(files):
    f = Fetcher()
    assert f.read(str(files / "a.bin")) == BODY
    assert f.read(Member(str(files / "a.bin"), 100, 50)) == BODY[100:150]
    with pytest.raises(FetchError) as e:
        f.read(Member(str(files / "a.bin"), len(BODY) - 10, 50))
    assert e.value.reason == "truncated"
    with pytest.raises(FetchError) as e:
        f.read(str(files / "missing.bin"))
    assert e.value.reason == "read_error" and "missing.bin" in str(e.value)


def test_nginx_whole_and_ranges(nginx):
    f = fast()
    assert f.read(f"{nginx.url}/a.bin") == BODY
    assert f.read(f"{nginx.url}/sub/b.bin") == BODY[:1000]
    assert f.read(Member(f"{nginx.url}/a.bin", 4000, 123)) == BODY[4000:4123]
    assert f.head(f"{nginx.url}/sub/b.bin") == BODY[:1000]          # shorter than a head
    assert f.head(f"{nginx.url}/a.bin", nbytes=10) == BODY[:10]
    with pytest.raises(FetchError) as e:
        f.read(f"{nginx.url}/nope.bin")
    assert e.value.reason == "http_4xx" and e.value.status == 404 and e.value.attempts == 1
    f.close()


def test_what_a_whole_read_sends(files):
    """Whole reads skip httpx's request objects (the transport's short way): the
    request must still carry the configured headers, a Range for a member, no
    compression, and reuse one kept-alive connection; a URL that needs
    normalising (a space, non-ASCII) takes httpx's way and arrives the same."""
    (files / "with space é.bin").write_bytes(BODY[:77])
    with FaultServer(files) as srv:
        f = fast(headers={"X-Team": "vision"})
        assert f.read(f"{srv.url}/a.bin") == BODY
        assert f.read(Member(f"{srv.url}/a.bin", 10, 20)) == BODY[10:30]
        assert f.read(f"{srv.url}/with space é.bin") == BODY[:77]
        whole, ranged = srv.requests("/a.bin")
        for rec in (whole, ranged):
            h = {k.lower(): v for k, v in rec.headers.items()}
            assert h["x-team"] == "vision" and h["accept-encoding"] == "identity"
            assert h["host"] == f"127.0.0.1:{srv.port}"
        assert whole.range is None and ranged.range == "bytes=10-29"
        assert whole.peer == ranged.peer                       # one kept-alive connection
        assert srv.requests("/with space é.bin")[0].headers.get("X-Team") == "vision"
        f.close()


@pytest.mark.parametrize("kind,reason", [("500", "http_5xx"), ("503", "http_5xx"),
                                         ("429", "http_429"), ("reset", "reset"),
                                         ("truncate", "truncated"), ("drop", "reset")])
def test_transient_faults_are_retried(files, kind, reason):
    with FaultServer(files) as srv:
        srv.add_fault("/a.bin", kind, times=2)
        f = fast()
        assert f.read(f"{srv.url}/a.bin") == BODY
        assert f.retried == {reason: 2}
        assert len(srv.requests("/a.bin")) == 3
        # a range read survives the same faults
        srv.add_fault("/a.bin", kind, times=2)
        assert f.read(Member(f"{srv.url}/a.bin", 10, 90)) == BODY[10:100]
        f.close()


def test_retry_after_is_honoured(files):
    with FaultServer(files) as srv:
        srv.add_fault("/a.bin", "429", times=1, retry_after=3)
        f = fast()
        assert f.read(f"{srv.url}/a.bin") == BODY
        assert f.waits and f.waits[0] >= 3.0                    # waited what the server asked


def test_backoff_grows_and_gives_up_with_the_last_reason(files):
    with FaultServer(files) as srv:
        srv.add_fault("/a.bin", "503", times=None)
        f = fast(retries=5, backoff_s=1.0, backoff_max_s=100)
        with pytest.raises(FetchError) as e:
            f.read(f"{srv.url}/a.bin")
        assert e.value.reason == "http_5xx" and e.value.status == 503 and e.value.attempts == 6
        assert "gave up after 6 attempts" in str(e.value)
        assert len(f.waits) == 5 and all(w <= 2 ** i for i, w in enumerate(f.waits))


@pytest.mark.parametrize("kind,status", [("403", 403), ("404", 404)])
def test_client_errors_are_not_retried(files, kind, status):
    with FaultServer(files) as srv:
        srv.add_fault("/a.bin", kind, times=None)
        f = fast()
        with pytest.raises(FetchError) as e:
            f.read(f"{srv.url}/a.bin")
        assert (e.value.reason, e.value.status) == ("http_4xx", status)
        assert len(srv.requests("/a.bin")) == 1


def test_wrong_content_type(files):
    with FaultServer(files) as srv:
        srv.add_fault("/a.bin", "wrong_type", times=None)
        with pytest.raises(FetchError) as e:
            fast().read(f"{srv.url}/a.bin")
        assert e.value.reason == "wrong_content_type"


def test_stall_times_out_then_recovers(files):
    with FaultServer(files) as srv:
        srv.add_fault("/a.bin", "stall", times=1, stall_s=5)
        f = fast(timeout_s=0.3)
        assert f.read(f"{srv.url}/a.bin") == BODY
        assert f.retried == {"timeout": 1}


def test_deadline_bounds_the_total_time(files):
    with FaultServer(files) as srv:
        srv.add_fault("/a.bin", "stall", times=None, stall_s=5)
        f = Fetcher(FetchConfig(timeout_s=0.2, retries=100, deadline_s=1.0, backoff_s=0.05))
        t0 = time.monotonic()
        with pytest.raises(FetchError) as e:
            f.read(f"{srv.url}/a.bin")
        assert e.value.reason == "timeout" and "deadline" in str(e.value)
        assert time.monotonic() - t0 < 5                      # bounded, not 100 x 0.2 s


def test_connection_refused_is_a_connect_failure():
    from servers import free_port
    f = fast(retries=1)
    with pytest.raises(FetchError) as e:
        f.read(f"http://127.0.0.1:{free_port()}/x.jpg")
    assert e.value.reason == "connect"


def test_secrets_never_show(files):
    with FaultServer(files) as srv:
        srv.add_fault("/a.bin", "404", times=None)
        f = fast(headers={"Authorization": "Bearer SECRET-TOKEN"})
        url = f"http://user:PASSWORD@127.0.0.1:{srv.port}/a.bin?X-Amz-Signature=SIGNATURE"
        with pytest.raises(FetchError) as e:
            f.read(url)
        text = str(e.value) + repr(e.value) + e.value.url + repr(f) + repr(f.config)
        for secret in ("SECRET-TOKEN", "PASSWORD", "SIGNATURE"):
            assert secret not in text
        # the token is sent (credentials in the URL take over as basic auth)
        with pytest.raises(FetchError):
            f.read(f"{srv.url}/a.bin")
        assert srv.requests("/a.bin")[-1].headers.get("Authorization") == "Bearer SECRET-TOKEN"
    assert redact("https://u:p@h:9/a/b.jpg?sig=1") == "https://h:9/a/b.jpg?..."


def test_a_forked_process_makes_its_own_client(nginx):
    f = fast()
    assert f.read(f"{nginx.url}/a.bin") == BODY
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                              # child: same Fetcher object
        try:
            ok = f.read(f"{nginx.url}/sub/b.bin") == BODY[:1000]
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    assert f.read(f"{nginx.url}/a.bin") == BODY


def test_redirects_are_followed_and_credentials_stay_on_their_host(files):
    """A 302 within the host keeps the Authorization header; one to another host
    (another port) drops it; a redirect loop is an error naming it."""
    import http.server
    import threading
    with FaultServer(files) as target:
        class Redirect(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                to = {"/same": "/a.bin", "/other": f"{target.url}/a.bin",
                      "/loop": "/loop"}.get(self.path)
                if self.path == "/a.bin":
                    # noted before the body goes out: the client checks as soon as it
                    # has the body (appending after the write was a race)
                    seen.append(self.headers.get("Authorization"))
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(BODY)))
                    self.end_headers()
                    self.wfile.write(BODY)
                    return
                self.send_response(302)
                self.send_header("Location", to)
                self.send_header("Content-Length", "0")
                self.end_headers()

        seen = []
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        try:
            f = fast(headers={"Authorization": "Bearer SECRET-1"})
            assert f.read(f"{base}/same") == BODY and seen == ["Bearer SECRET-1"]
            assert f.read(f"{base}/other") == BODY
            assert target.log[-1].headers.get("Authorization") is None
            with pytest.raises(FetchError, match="redirects") as e:
                f.read(f"{base}/loop")
            assert "SECRET" not in str(e.value)
        finally:
            srv.shutdown()
            srv.server_close()


def test_tls_is_verified_by_default(files, tmp_path):
    """An HTTPS server with a self-signed certificate: refused by default (the error
    names the certificate), read with verify_tls=False."""
    import datetime
    import http.server
    import ipaddress
    import ssl
    import threading
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(pkey.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .sign(pkey, hashes.SHA256()))
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(files), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{srv.server_address[1]}/a.bin"
    try:
        with pytest.raises(FetchError) as e:
            fast(retries=1).read(url)
        assert e.value.reason == "connect" and "certificate" in str(e.value).lower()
        assert fast(verify_tls=False).read(url) == BODY
    finally:
        srv.shutdown()
        srv.server_close()


def test_stale_kept_alive_connections_are_not_failures(files):
    """nginx closes idle connections after 1 s; after a pause every pooled
    connection is stale, and the next reads still succeed without a retry."""
    with Nginx(files, extra_server="keepalive_timeout 1s;") as ng:
        f = fast()
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as ex:            # 8 connections into the pool
            assert all(d == BODY for d in ex.map(f.read, [f"{ng.url}/a.bin"] * 32))
        time.sleep(2.0)
        for _ in range(4):
            assert f.read(f"{ng.url}/a.bin") == BODY
        assert f.retried == {} and f.waits == []
