"""The fetch layer against real servers on loopback: nginx for plain files and
ranges, the project's fault-injecting server for every failure it classifies."""

from __future__ import annotations

import os
import re
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


def test_redirects_are_followed_once_and_credentials_stay_on_their_origin(files):
    """Every redirect status, relative and absolute Locations, on both of the
    fetcher's ways (the transport's short way for plain URLs, httpx requests for
    the rest, and streams): each URL is requested exactly once, the bytes are
    right, the Authorization header stays on its origin while other headers and
    the Range follow."""
    with FaultServer(files) as origin, FaultServer(files) as other:
        f = fast(headers={"Authorization": "Bearer SECRET-1", "X-Team": "vision"})
        for status in (301, 302, 303, 307, 308):
            origin.add_fault(f"/same{status}", status, times=None, location="/a.bin")
            origin.add_fault(f"/rel{status}/x", status, times=None, location="../sub/b.bin")
            origin.add_fault(f"/other{status}", status, times=None,
                             location=f"{other.url}/a.bin")
        origin.add_fault("/with space é", "302", times=None,
                         location=f"{other.url}/sub/b.bin")
        origin.add_fault("/member", "307", times=None, location=f"{other.url}/a.bin")
        origin.add_fault("/streamed", "302", times=None, location=f"{other.url}/a.bin")
        reads = []
        for status in (301, 302, 303, 307, 308):
            reads += [(f"/same{status}", "/a.bin", BODY, True),
                      (f"/rel{status}/x", "/sub/b.bin", BODY[:1000], True),
                      (f"/other{status}", "/a.bin", BODY, False)]
        reads.append(("/with space é", "/sub/b.bin", BODY[:1000], False))
        for path, to, body, same in reads:
            n_origin, n_other = len(origin.log), len(other.log)
            url = f"{origin.url}{path.replace('é', '%C3%A9') if ' ' not in path else path}"
            assert f.read(url) == body, path
            asked = origin.log[n_origin:] + other.log[n_other:]
            assert [r.path for r in asked] == [path, to], path          # each URL once
            got = asked[1].headers
            assert got.get("Authorization") == ("Bearer SECRET-1" if same else None), path
            assert got.get("X-Team") == "vision", path
            assert (asked[1] in other.log) == (not same)
        assert f.read(Member(f"{origin.url}/member", 100, 50)) == BODY[100:150]
        assert other.log[-1].range == "bytes=100-149"
        assert other.log[-1].headers.get("Authorization") is None
        assert b"".join(f.stream(f"{origin.url}/streamed")) == BODY
        assert [len(origin.requests(p)) for p in ("/member", "/streamed")] == [1, 1]
        assert other.log[-1].headers.get("Authorization") is None
        assert not f.retried


def test_redirects_that_lead_nowhere_fail_at_once(files):
    """A redirect loop, more than 10 redirects, a Location that is not HTTP(S) and a
    3xx without a Location: a FetchError ``redirect`` naming the case (no secrets
    in it), never retried, every URL of the chain requested once; an optional read
    takes them as a missing file.  (A dataset counts them: test_index_source.)"""
    with FaultServer(files) as srv:
        f = fast(headers={"Authorization": "Bearer SECRET-1"})
        srv.add_fault("/loop", "302", times=None, location="/loop?sig=SECRET-2")
        srv.add_fault("/ping", "302", times=None, location="/pong")
        srv.add_fault("/pong", "301", times=None, location=f"{srv.url}/ping")
        for i in range(12):
            srv.add_fault(f"/hop{i}", "307", times=None, location=f"/hop{i + 1}")
        srv.add_fault("/ftp", "302", times=None, location="ftp://127.0.0.1/a.bin")
        srv.add_fault("/nowhere", "302", times=None)
        cases = [("/loop", "redirect loop", ["/loop", "/loop"]),
                 ("/ping", "redirect loop", ["/ping", "/pong"]),
                 ("/hop0", "more than 10 redirects", [f"/hop{i}" for i in range(11)]),
                 ("/ftp", "ftp: location, not HTTP(S)", ["/ftp"]),
                 ("/nowhere", "HTTP 302 without a Location to follow", ["/nowhere"])]
        for path, message, asked in cases:
            for read in (f.read, f.stream):
                n = len(srv.log)
                with pytest.raises(FetchError, match=re.escape(message)) as e:
                    b"".join(read(f"{srv.url}{path}"))
                assert (e.value.reason, e.value.attempts) == ("redirect", 1), path
                assert "SECRET" not in str(e.value) + e.value.url
                # (the loop to itself differs by its query string: requested twice)
                assert [r.path for r in srv.log[n:]] == asked, (path, read)
            assert f.read_optional(f"{srv.url}{path}") is None
        assert not f.retried


def test_a_signed_s3_request_redirected_elsewhere_loses_its_signature(files, monkeypatch):
    """An s3:// read whose endpoint redirects to another origin: the signature
    (Authorization) and the X-Amz-* headers -- the session token among them -- reach
    the endpoint only."""
    with FaultServer(files) as endpoint, FaultServer(files) as other:
        for k, v in {"AWS_ENDPOINT_URL": endpoint.url, "AWS_ACCESS_KEY_ID": "AKIDTEST",
                     "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "SESSION-TOKEN",
                     "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        endpoint.add_fault("/bucket/a.bin", "307", times=None, location=f"{other.url}/a.bin")
        f = fast()
        assert f.read("s3://bucket/a.bin") == BODY
        assert f.read(Member("s3://bucket/a.bin", 5, 10)) == BODY[5:15]
        signed = [r.headers for r in endpoint.requests("/bucket/a.bin")]
        sent = [r.headers for r in other.requests("/a.bin")]
        assert len(signed) == len(sent) == 2
        for h in signed:
            assert h["Authorization"].startswith("AWS4-HMAC-SHA256")
            assert h["X-Amz-Security-Token"] == "SESSION-TOKEN"
        for h in sent:
            assert not [k for k in h if k.lower() == "authorization" or
                        k.lower().startswith("x-amz-")], h
        assert sent[1]["Range"] == "bytes=5-14"


def _sigv4_holds(record, secret: str, region: str = "us-east-1") -> bool:
    """Whether the SigV4 signature of a request the FaultServer received is valid
    for the request as received (its path, Host and signed headers), as S3 checks
    it: the signature recomputed from them and the secret."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    auth = record.headers["Authorization"]
    fields = dict(part.strip().split("=", 1) for part in auth.split(" ", 1)[1].split(","))
    key_id, _, scope = fields["Credential"].partition("/")
    signed = fields["SignedHeaders"].split(";")
    assert scope.endswith(f"/{region}/s3/aws4_request") and "host" in signed
    headers = {k.lower(): v for k, v in record.headers.items() if k.lower() in signed}
    req = AWSRequest(method=record.method, url=f"http://{headers['host']}{record.path}",
                     headers=headers)
    req.context["timestamp"] = headers["x-amz-date"]
    signer = S3SigV4Auth(Credentials(key_id, secret), "s3", region)
    want = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
    return fields["Signature"] == want


def test_a_signed_s3_request_redirected_on_its_origin_is_signed_again(files, monkeypatch):
    """An s3:// read whose endpoint redirects to another path of its own: the
    follow-up carries a signature of its own path (the old one covers the old path:
    S3 would refuse it, SignatureDoesNotMatch), with the session token and the Range,
    on both ways (whole and ranged reads, a stream, a size).  A redirect from there
    to another origin is not signed, on either way."""
    with FaultServer(files) as endpoint, FaultServer(files) as other:
        for k, v in {"AWS_ENDPOINT_URL": endpoint.url, "AWS_ACCESS_KEY_ID": "AKIDTEST",
                     "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "SESSION-TOKEN",
                     "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        endpoint.add_fault("/bucket/old.bin", "307", times=None, location="/a.bin")
        endpoint.add_fault("/bucket/rel/x.bin", "302", times=None, location="../../sub/b.bin")
        f = fast()
        assert f.read("s3://bucket/old.bin") == BODY
        assert f.read(Member("s3://bucket/old.bin", 5, 10)) == BODY[5:15]
        assert f.read("s3://bucket/rel/x.bin") == BODY[:1000]
        assert b"".join(f.stream("s3://bucket/old.bin")) == BODY
        assert f.size("s3://bucket/rel/x.bin") == 1000
        asked = [r for r in endpoint.log]
        assert [r.path for r in asked] == ["/bucket/old.bin", "/a.bin"] * 2 + [
            "/bucket/rel/x.bin", "/sub/b.bin", "/bucket/old.bin", "/a.bin",
            "/bucket/rel/x.bin", "/sub/b.bin"]
        for first, then in zip(asked[::2], asked[1::2]):
            assert _sigv4_holds(first, "secret"), first.path
            assert _sigv4_holds(then, "secret"), (first.path, then.path)
            old, new = first.headers, then.headers
            assert new["Authorization"] != old["Authorization"]
            assert new["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDTEST/")
            signed = new["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
            assert {"host", "x-amz-date", "x-amz-security-token"} <= set(signed)
            assert new["X-Amz-Security-Token"] == "SESSION-TOKEN"
            assert then.range == first.range and ("range" in signed) == bool(then.range)
        assert asked[3].range == "bytes=5-14" and asked[9].range == "bytes=0-0"
        endpoint.add_fault("/a.bin", "302", times=None, location=f"{other.url}/sub/b.bin")
        assert f.read("s3://bucket/old.bin") == BODY[:1000]
        assert b"".join(f.stream("s3://bucket/old.bin")) == BODY[:1000]
        assert [r.path for r in endpoint.log[len(asked):]] == ["/bucket/old.bin", "/a.bin"] * 2
        for r in endpoint.log[len(asked):]:
            assert _sigv4_holds(r, "secret"), r.path
        for r in other.log:
            assert not [k for k in r.headers if k.lower() == "authorization" or
                        k.lower().startswith("x-amz-")], r.headers
        assert len(other.log) == 2 and not f.retried


def test_redirects_through_an_environment_proxy(files, monkeypatch):
    """With HTTP_PROXY set the requests take httpx's own transport: redirects keep
    the same rules (one request per URL, Authorization not sent to another origin).
    The FaultServer stands in for the proxy (it serves its files whatever the host)."""
    with FaultServer(files) as proxy:
        for k in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY",
                  "https_proxy", "http_proxy"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        proxy.add_fault("/old", "302", times=None, location="/a.bin")
        proxy.add_fault("/away", "302", times=None, location="http://elsewhere.invalid/a.bin")
        proxy.add_fault("/loop", "302", times=None, location="/loop")
        f = fast(headers={"Authorization": "Bearer SECRET-1"})
        assert f.read("http://origin.invalid/old") == BODY
        assert f._transport is None                       # (httpx's transport)
        assert f.read("http://origin.invalid/away") == BODY
        assert [len(proxy.requests(p)) for p in ("/old", "/away", "/a.bin")] == [1, 1, 2]
        same, away = (r.headers for r in proxy.requests("/a.bin"))
        assert same["Host"] == "origin.invalid" and same["Authorization"] == "Bearer SECRET-1"
        assert away["Host"] == "elsewhere.invalid" and "Authorization" not in away
        with pytest.raises(FetchError, match="redirect loop") as e:
            f.read("http://origin.invalid/loop")
        assert e.value.reason == "redirect" and len(proxy.requests("/loop")) == 1
        f.close()


def test_nginx_redirects_and_errors_keep_one_connection(files):
    """nginx's own redirects (``return 302``, 301) and error pages (404, 503): each
    URL is requested once, and the small bodies of those responses are read so the
    next request reuses the connection (nginx logs ``$connection``); an error page
    larger than the drain limit (64 KiB) closes it instead."""
    from datago._http import DRAIN_LIMIT
    (files / "big.bin").write_bytes(bytes(DRAIN_LIMIT + 1))
    extra = """
        location = /old { return 302 /a.bin; }
        location = /moved { return 301 $scheme://$http_host/sub/b.bin; }
        location = /busy { return 503; }
        location = /big404 { error_page 404 /big.bin; return 404; }
    """
    with Nginx(files, extra_server=extra,
               log_format="$connection $connection_requests $status $request_uri") as n:
        f = fast(retries=2)
        assert f.read(f"{n.url}/old") == BODY
        assert f.read(f"{n.url}/moved") == BODY[:1000]
        assert f.read(Member(f"{n.url}/old", 10, 20)) == BODY[10:30]
        with pytest.raises(FetchError) as e:
            f.read(f"{n.url}/nope.bin")
        assert e.value.reason == "http_4xx"
        with pytest.raises(FetchError) as e:
            f.read(f"{n.url}/busy")
        assert (e.value.reason, e.value.attempts) == ("http_5xx", 3)
        with pytest.raises(FetchError):                       # (a stream: httpx's way)
            b"".join(f.stream(f"{n.url}/busy"))
        assert b"".join(f.stream(f"{n.url}/old")) == BODY
        assert f.read(f"{n.url}/a.bin") == BODY
        with pytest.raises(FetchError) as e:
            f.read(f"{n.url}/big404")
        assert e.value.status == 404
        assert f.read(f"{n.url}/a.bin") == BODY
        log = [line.split() for line in n.access_log()]
        f.close()
    assert [(s, u) for _, _, s, u in log] == [
        ("302", "/old"), ("200", "/a.bin"), ("301", "/moved"), ("200", "/sub/b.bin"),
        ("302", "/old"), ("206", "/a.bin"), ("404", "/nope.bin")] + \
        [("503", "/busy")] * 6 + [("302", "/old"), ("200", "/a.bin"), ("200", "/a.bin"),
                                  ("404", "/big404"), ("200", "/a.bin")]
    conns = [c for c, _, _, _ in log]
    assert len(set(conns[:-1])) == 1, log                 # one connection up to the big 404
    assert conns[-1] != conns[-2], log                    # which closed it
    assert [int(r) for _, r, _, _ in log[:-1]] == list(range(1, len(log)))


def test_small_error_bodies_keep_the_connection(files):
    """The project's server, its error bodies by size and framing: a 404 or 503 with
    a short body (Content-Length or chunked) keeps the connection for the next
    request; one larger than the drain limit, or a chunked one that runs past it,
    closes it."""
    from datago._http import DRAIN_LIMIT
    with FaultServer(files) as srv:
        f = fast(retries=3)
        url = f"{srv.url}/a.bin"

        def peers_after(fault_kwargs, expect_kept):
            n = len(srv.log)
            srv.add_fault("/a.bin", **fault_kwargs)
            assert f.read(url) == BODY
            first, *rest = srv.log[n:]
            assert all(r.peer == first.peer for r in rest[:-1])
            assert (rest[-1].peer == first.peer) == expect_kept, fault_kwargs

        assert f.read(url) == BODY
        peers_after(dict(kind="503", times=3), True)
        peers_after(dict(kind="503", times=2, chunked=True, body=b"x" * 10000), True)
        peers_after(dict(kind="503", times=1, body=b"x" * DRAIN_LIMIT), True)
        peers_after(dict(kind="503", times=1, body=b"x" * (DRAIN_LIMIT + 1)), False)
        peers_after(dict(kind="503", times=1, chunked=True, body=b"x" * (DRAIN_LIMIT + 1)),
                    False)
        for kind in ("404", "403"):
            n = len(srv.log)
            srv.add_fault("/a.bin", kind, times=2)
            for _ in range(2):
                with pytest.raises(FetchError):
                    f.read(url)
            assert f.read(url) == BODY
            assert len({r.peer for r in srv.log[n:]}) == 1, kind
        f.close()


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


def test_size_checks_reuse_one_connection(files):
    """``Fetcher.size`` (a one-byte ranged GET per shard or archive) reads its byte,
    so a run of size checks keeps one kept-alive connection (nginx's ``$connection``)."""
    with Nginx(files, log_format="$connection $status $request_uri") as n:
        f = fast(retries=0)
        assert [f.size(f"{n.url}/a.bin") for _ in range(4)] == [len(BODY)] * 4
        assert f.read(f"{n.url}/a.bin") == BODY
        log = [line.split() for line in n.access_log()]
        f.close()
    assert [(s, u) for _, s, u in log] == [("206", "/a.bin")] * 4 + [("200", "/a.bin")]
    assert len({c for c, _, _ in log}) == 1, log


class ScriptedServer:
    """A TCP server on loopback that answers each request head it reads with the
    next scripted reply, bytes as given (``None``: close the connection without a
    reply).  ``log`` holds (connection number, request head) per request."""

    def __init__(self, replies):
        import socket
        import threading
        self.replies = list(replies)
        self.log = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        n = 0
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            n += 1
            with conn:
                data = b""
                while self.replies:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if b"\r\n\r\n" not in data:
                        break
                    head, _, data = data.partition(b"\r\n\r\n")
                    self.log.append((n, head.decode("latin-1")))
                    reply = self.replies.pop(0)
                    if reply is None:
                        break
                    conn.sendall(reply)
                    if b"Connection: close" in reply or (reply.startswith(b"HTTP/1.0")
                                                         and b"keep-alive" not in reply):
                        break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()
        self.thread.join(5)


def _reply(body: bytes, *headers: str, status: str = "200 OK", version: str = "HTTP/1.1"):
    head = [f"{version} {status}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def test_the_short_way_reads_every_framing_http_allows():
    """The transport's short way (plain GETs) parses responses itself: a chunked
    body with extensions and trailers, a body ended by the peer closing, an
    HTTP/1.0 reply, interim 100 and 103 replies before the real one, folded and
    repeated headers, an equal repeated Content-Length, and a head with bare LF
    line ends (its body holding a CRLF blank line); a kept-alive
    connection serves the next request, the others do not."""
    chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    replies = [
        _reply(chunked, "Transfer-Encoding: chunked", "Content-Type: image/jpeg"),
        _reply(b"abc", "Content-Length: 3", "X-Long: part one,", "  part two",
               "Set-Cookie: a=1", "Set-Cookie: b=2"),
        _reply(b"", status="100 Continue") + _reply(b"", status="103 Early Hints",
                                                    version="HTTP/1.1")
        + _reply(b"four", "Content-Length: 4, 4"),
        _reply(b"until the end", "Connection: close"),
        _reply(b"old", "Content-Length: 3", version="HTTP/1.0"),
        _reply(b"kept", "Content-Length: 4", "Connection: keep-alive", version="HTTP/1.0"),
        _reply(b"again", "Content-Length: 5"),
        b"HTTP/1.1 200 OK\nContent-Length: 6\n\nx\n\r\nyz",     # bare LF ends
    ]
    with ScriptedServer(replies) as srv:
        f = fast(retries=0)
        got = [f.read(f"{srv.url}/{i}") for i in range(8)]
        assert got == [b"hello world", b"abc", b"four", b"until the end", b"old", b"kept",
                       b"again", b"x\n\r\nyz"]
        conns = [n for n, _ in srv.log]
        # 0-3 share a connection, which 3 closes; 4 (HTTP/1.0) ends its own; 5-6 share one
        assert conns == [1, 1, 1, 1, 2, 3, 3, 3], conns
        assert f.retried == {}
        head = srv.log[0][1].split("\r\n")
        assert head[0] == "GET /0 HTTP/1.1"
        assert head[1] == f"Host: {srv.url[len('http://'):]}"
        from datago._http import StdlibTransport
        t = StdlibTransport(timeout=2)
    with ScriptedServer([_reply(b"abc", "Content-Length: 3", "X-Long: part one,",
                                "  part two", "Set-Cookie: a=1", "Set-Cookie: b=2")]) as srv:
        status, headers, body = t.get(f"{srv.url}/h", {})
        assert (status, body) == (200, b"abc")
        assert headers["x-long"] == "part one, part two" == headers.get("X-LONG")
        assert headers.get("set-cookie") == "a=1, b=2" and "Content-Length" in headers
        t.close()


@pytest.mark.parametrize("reply, reason, text", [
    (_reply(b"ab", "Content-Length: 5"), "truncated", "complete message body"),
    (_reply(b"3\r\nab", "Transfer-Encoding: chunked"), "truncated", "complete message body"),
    (_reply(b"zz\r\n", "Transfer-Encoding: chunked"), "reset", "bad chunk size"),
    (_reply(b"abc", "Content-Length: 3, 4"), "reset", "bad Content-Length"),
    (b"HTTP/1.1 2xx OK\r\n\r\n", "reset", "bad status line"),
    (b"SPDY 200 OK\r\n\r\n", "reset", "bad status line"),
    (_reply(b"", "No colon here"), "reset", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * (70 << 10), "reset", "response head over"),
    (b"HTTP/1.1 200 O", "reset", "middle of a response head"),
    (None, "reset", "disconnected without sending a response"),
])
def test_the_short_way_fails_broken_responses_with_their_reason(reply, reason, text):
    """Each broken response is a failure of the reason the retry policy knows,
    with a message naming what was wrong (no retries here: each is tried once)."""
    with ScriptedServer([reply]) as srv:
        f = fast(retries=0)
        with pytest.raises(FetchError) as e:
            f.read(f"{srv.url}/x")
    assert e.value.reason == reason
    assert text in str(e.value)


def test_the_short_way_refuses_headers_that_would_smuggle_another():
    from datago._http import StdlibTransport
    t = StdlibTransport(timeout=2)
    for bad in ({"X-A": "1\r\nX-B: 2"}, {"X-A": "1\nGET / HTTP/1.1"}, {"X A": "1"},
                {"X-A:": "1"}):
        with pytest.raises(ValueError, match="invalid (value for )?header"):
            t.get("http://127.0.0.1:9/x", bad)
    with pytest.raises(ValueError, match="invalid request target"):
        t.get("http://127.0.0.1:9/a\x01b", {})


# ----------------------------------------------------------------------------- bounded bodies

def test_a_body_over_max_object_bytes_is_refused_before_it_is_read(files, nginx):
    """Whole reads are bounded by ``max_object_bytes``: a file by its size, a
    response by its Content-Length (nginx), by what has arrived when it has none
    (a chunked body, a body read until the peer closes); each fails at once
    (no retry) as ``too_large``, naming the size and the bound."""
    f = fast(max_object_bytes=len(BODY) - 1)
    for loc, size in [(str(files / "a.bin"), f"{len(BODY):,} bytes"),
                      (f"{nginx.url}/a.bin", f"{len(BODY):,} bytes")]:
        with pytest.raises(FetchError) as e:
            f.read(loc)
        assert e.value.reason == "too_large" and e.value.attempts == 1
        assert f"{size}, over max_object_bytes ({len(BODY) - 1:,} bytes)" in str(e.value)
    assert f.read(f"{nginx.url}/sub/b.bin") == BODY[:1000]            # under it: read
    assert fast(max_object_bytes=len(BODY)).read(str(files / "a.bin")) == BODY
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(BODY[i:i + 4096]), BODY[i:i + 4096])
                       for i in range(0, len(BODY), 4096)) + b"0\r\n\r\n"
    replies = [_reply(chunked, "Transfer-Encoding: chunked"),
               _reply(BODY, "Connection: close"),
               _reply(chunked, "Transfer-Encoding: chunked")]
    with ScriptedServer(replies) as srv:
        small = fast(max_object_bytes=5000, retries=0)
        for i in range(2):
            with pytest.raises(FetchError) as e:
                small.read(f"{srv.url}/{i}")
            assert e.value.reason == "too_large"
            assert "more than 5,000 bytes, over max_object_bytes" in str(e.value)
        assert fast(max_object_bytes=len(BODY)).read(f"{srv.url}/2") == BODY
        assert [n for n, _ in srv.log] == [1, 2, 3]     # no connection kept after a refusal


def test_a_member_from_a_server_that_ignores_range(files):
    """nginx with ``max_ranges 0`` answers a Range request with the whole file (HTTP
    200).  A small object is cut here; one over the bound fails as
    ``range_ignored`` (not retried, its body not read) instead of arriving whole
    for every member."""
    with Nginx(files, extra_server="max_ranges 0;") as n:
        url = f"{n.url}/a.bin"
        assert fast().read(Member(url, 4000, 123)) == BODY[4000:4123]       # cut here
        f = fast(max_object_bytes=len(BODY) // 2)
        with pytest.raises(FetchError) as e:
            f.read(Member(url, 4000, 123))
        assert e.value.reason == "range_ignored" and e.value.status == 200
        assert e.value.attempts == 1
        assert (f"ignored the Range request for bytes 4000-4122 and sent the whole object "
                f"({len(BODY):,} bytes)") in str(e.value)
        # a header probe reads what the sample will: the whole object, within the bound
        assert fast().head(url, nbytes=10) == BODY[:10]
        with pytest.raises(FetchError) as e:
            f.head(url, nbytes=10)
        assert e.value.reason == "too_large" and "over max_object_bytes" in str(e.value)
        log = n.access_log()
    assert sum(" 200 " in line for line in log) == 4 and not any(" 206 " in line for line in log)


def test_the_httpx_way_is_bounded_too(nginx):
    """Responses read through httpx (environment proxies, URLs the short way does
    not take) go through the same bound."""
    import httpx
    from datago.fetch import _read_at_most
    with httpx.Client() as c:
        with c.stream("GET", f"{nginx.url}/a.bin") as r:
            assert _read_at_most(r, len(BODY) - 1) is None            # by Content-Length
        with c.stream("GET", f"{nginx.url}/a.bin") as r:
            assert _read_at_most(r, len(BODY)) == BODY
        with c.stream("GET", f"{nginx.url}/a.bin") as r:
            del r.headers["content-length"]                           # as it arrives
            assert _read_at_most(r, 100) is None


def test_a_range_answered_with_other_bytes_is_refused():
    """A 206 must carry the range asked for: a proxy that answers with other bytes
    (another offset, none named) fails as ``bad_range`` -- those bytes would be
    read as the member's -- while a header probe's range may end at the object's
    end."""
    part = BODY[100:150]
    replies = [_reply(part, "Content-Length: 50", "Content-Range: bytes 0-49/16384",
                      status="206 Partial Content"),
               _reply(part, "Content-Length: 50", status="206 Partial Content"),
               _reply(part, "Content-Length: 50", "Content-Range: bytes 100-149/16384",
                      status="206 Partial Content"),
               _reply(BODY[:30], "Content-Length: 30", "Content-Range: bytes 0-29/30",
                      status="206 Partial Content")]
    with ScriptedServer(replies) as srv:
        f = fast(retries=0)
        for shown in ("'bytes 0-49/16384'", "'(none)'"):
            with pytest.raises(FetchError) as e:
                f.read(Member(f"{srv.url}/a.bin", 100, 50))
            assert e.value.reason == "bad_range" and e.value.attempts == 1
            assert f"asked for bytes 100-149, the server sent Content-Range {shown}" in str(e.value)
        assert f.read(Member(f"{srv.url}/a.bin", 100, 50)) == part
        assert f.head(f"{srv.url}/small.bin", nbytes=64) == BODY[:30]


def test_a_compressed_body_is_inflated_or_refused():
    """datago asks for ``identity``; a server that compresses anyway: a whole gzip
    or deflate body is inflated, a compressed range or another coding fails as
    ``wrong_content_type`` (never read as the image's bytes)."""
    import gzip
    import zlib
    gz, zl = gzip.compress(BODY), zlib.compress(BODY)
    raw = zlib.compressobj(wbits=-15)
    raw = raw.compress(BODY) + raw.flush()
    replies = [_reply(gz, f"Content-Length: {len(gz)}", "Content-Encoding: gzip"),
               _reply(zl, f"Content-Length: {len(zl)}", "Content-Encoding: deflate"),
               _reply(raw, f"Content-Length: {len(raw)}", "Content-Encoding: deflate"),
               _reply(b"xyz", "Content-Length: 3", "Content-Encoding: br"),
               _reply(gz[:20], "Content-Length: 20", "Content-Range: bytes 0-19/999",
                      "Content-Encoding: gzip", status="206 Partial Content"),
               _reply(gz[:-12], f"Content-Length: {len(gz) - 12}", "Content-Encoding: gzip"),
               _reply(gz, f"Content-Length: {len(gz)}", "Content-Encoding: gzip")]
    with ScriptedServer(replies) as srv:
        f = fast(retries=0)
        assert [f.read(f"{srv.url}/{i}") for i in range(3)] == [BODY] * 3
        with pytest.raises(FetchError, match="a body sent with Content-Encoding 'br'") as e:
            f.read(f"{srv.url}/3")
        assert e.value.reason == "wrong_content_type"
        with pytest.raises(FetchError, match="a Range request answered with Content-Enc") as e:
            f.read(Member(f"{srv.url}/4", 0, 20))
        assert e.value.reason == "wrong_content_type"
        with pytest.raises(FetchError, match="a gzip body that ends early") as e:
            f.read(f"{srv.url}/5")
        assert e.value.reason == "truncated"
        f.close()                               # (the server serves one connection at a time)
        with pytest.raises(FetchError, match="over max_object_bytes") as e:   # inflated size
            fast(retries=0, max_object_bytes=len(BODY) - 1).read(f"{srv.url}/6")
        assert e.value.reason == "too_large"


def test_a_stream_resumed_at_other_bytes_is_refused():
    """A stream that breaks is resumed with ``Range: bytes=N-``; a 206 that starts
    elsewhere fails as ``bad_range`` (its bytes would be spliced into the
    shard), while one that starts at N completes it."""
    for second, ok in [(_reply(BODY, f"Content-Length: {len(BODY)}",
                               f"Content-Range: bytes 0-{len(BODY) - 1}/{len(BODY)}",
                               status="206 Partial Content"), False),
                       (_reply(BODY[5000:], f"Content-Length: {len(BODY) - 5000}",
                               f"Content-Range: bytes 5000-{len(BODY) - 1}/{len(BODY)}",
                               status="206 Partial Content"), True)]:
        first = _reply(BODY[:5000], f"Content-Length: {len(BODY)}", "Connection: close")
        with ScriptedServer([first, second]) as srv:
            f = fast(retries=2)
            if ok:
                assert b"".join(f.stream(f"{srv.url}/s.tar", chunk_size=4096)) == BODY
                assert f.retried.get("resumed") == 1
            else:
                with pytest.raises(FetchError) as e:
                    b"".join(f.stream(f"{srv.url}/s.tar", chunk_size=4096))
                assert e.value.reason == "bad_range"
                assert "resumed from byte 5000, the server sent Content-Range 'bytes 0-" \
                    in str(e.value)
            assert "Range: bytes=5000-" in srv.log[1][1]


def test_a_member_of_an_archive_that_changed_size(files, nginx):
    """A member knows the size of the archive its offset was taken from
    (``total``): a file or object of another size fails as ``stale_index``
    (local: a stat; remote: the total of the 206's Content-Range)."""
    for url in (str(files / "a.bin"), f"{nginx.url}/a.bin"):
        f = fast()
        assert f.read(Member(url, 100, 50, total=len(BODY))) == BODY[100:150]
        with pytest.raises(FetchError) as e:
            f.read(Member(url, 100, 50, total=len(BODY) - 512))
        assert e.value.reason == "stale_index" and e.value.attempts == 1
        assert f"is {len(BODY):,} bytes, but its index was made for {len(BODY) - 512:,}" \
            in str(e.value)
