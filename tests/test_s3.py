"""s3:// locations against moto's S3 server on loopback: SigV4 from botocore, the
standard AWS_* environment, range reads, index and WebDataset sources."""

from __future__ import annotations

import json

import pytest

import botocore  # noqa: F401  (test dependencies: setup.sh installs them; fail if absent)
import moto  # noqa: F401

from datago import DatagoDataset
from datago.fetch import FetchError, Fetcher, Member
from servers import HOST, MotoS3
from test_webdataset import IMAGE, by_key, make_folder, make_shards, wds_cfg


@pytest.fixture(scope="module")
def s3():
    with MotoS3() as m:
        yield m


def _use_env(monkeypatch, env: dict) -> None:
    """The AWS environment of a test server, and nothing of the machine's."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def aws_env(s3, monkeypatch):
    _use_env(monkeypatch, s3.env)
    return s3


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):
    base = tmp_path_factory.mktemp("s3data")
    samples = make_folder(base / "folder", n=12)
    make_shards(base / "shards", samples, n_shards=2)
    c = s3.client()
    c.create_bucket(Bucket="data")
    for key, parts in samples:
        for ext, data in parts.items():
            c.put_object(Bucket="data", Key=f"folder/{key}.{ext}", Body=data)
    for p in sorted((base / "shards").iterdir()):
        c.put_object(Bucket="data", Key=f"shards/{p.name}", Body=p.read_bytes())
    c.put_object(Bucket="data", Key="odd name/a b+c.bin", Body=b"0123456789")
    return base, samples


def test_signed_reads_and_ranges(aws_env, bucket):
    f = Fetcher()
    assert f.read("s3://data/odd name/a b+c.bin") == b"0123456789"
    assert f.read(Member("s3://data/odd name/a b+c.bin", 3, 4)) == b"3456"
    with pytest.raises(FetchError) as e:
        f.read("s3://data/missing.jpg")
    assert e.value.reason == "http_4xx" and e.value.status == 404
    assert "testing-secret" not in str(e.value)


def test_requests_are_sigv4_signed_with_the_range(aws_env):
    """moto accepts any signature, so check what is sent: SigV4 from the AWS_*
    environment, the Range header signed, the secret nowhere."""
    f = Fetcher()
    url, headers = f.prepare("s3://data/a/b c.jpg", {"Range": "bytes=0-9"})
    assert url == f"{aws_env.url}/data/a/b%20c.jpg"                 # path-style endpoint
    auth = headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=testing/")
    assert "/us-east-1/s3/aws4_request" in auth and "range" in auth.split("SignedHeaders=")[1]
    assert "X-Amz-Date" in headers and "testing-secret" not in json.dumps(headers)
    with pytest.raises(FetchError, match="s3://bucket/key"):
        f.read("s3://only-a-bucket")


def test_index_of_s3_urls_equals_the_folder_source(aws_env, bucket, tmp_path):
    base, samples = bucket
    index = tmp_path / "list.txt"
    index.write_text("\n".join(f"s3://data/folder/{k}.jpg" for k, _ in samples))
    ds = DatagoDataset({"source_type": "index",
                        "source_config": {"index": str(index), "cache_dir": str(tmp_path / "c")},
                        "image_config": IMAGE, "batch_size": 3, "seed": 2})
    assert ds._remote
    got = {sid.split("/folder/", 1)[1].rsplit(".", 1)[0]: v for sid, v in by_key(ds).items()}
    want = by_key(DatagoDataset({"source_config": {"root_path": str(base / "folder")},
                                 "image_config": IMAGE, "batch_size": 3, "seed": 2}),
                  strip_ext=True)
    assert set(got) == {k for k, _ in samples}
    for k, _ in samples:
        assert got[k][:3] == want[k][:3]


def test_webdataset_shards_on_s3(aws_env, bucket, tmp_path):
    base, samples = bucket
    ds = DatagoDataset(wds_cfg("s3://data/shards/shard-{000..001}.tar",
                               source={"cache_dir": str(tmp_path / "c")}))
    assert ds.listing.built == 2
    got = by_key(ds)
    local = by_key(DatagoDataset(wds_cfg(str(base / "shards" / "shard-{000..001}.tar"),
                                         source={"cache_dir": str(tmp_path / "c2")})))
    assert got == local and set(got) == {k for k, _ in samples}


class FrontedMoto:
    """moto's S3 in this process with IAM authentication on -- every request's SigV4
    signature is checked against an IAM user's secret key, as S3 does -- behind a
    front on the same origin that answers the paths in ``answers`` itself
    (``path: (status line, headers[, body])``): redirects on the origin, and S3's
    wrong-region replies.  ``env``: the AWS_* variables of that user."""

    def __init__(self):
        import threading
        from moto.moto_server.werkzeug_app import (DomainDispatcherApplication,
                                                   create_backend_app)
        from werkzeug.serving import make_server
        moto_app = DomainDispatcherApplication(create_backend_app)
        self.answers = {}

        def app(environ, start_response):
            answer = self.answers.get(environ["PATH_INFO"])
            if answer is None:
                return moto_app(environ, start_response)
            status, headers, body = (*answer, b"")[:3]
            start_response(status, [*headers, ("Content-Length", str(len(body)))])
            return [body]

        self._server = make_server(HOST, 0, app, threaded=True)
        self.url = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def client(self, service):
        """A botocore client for the setup (made before authentication is on)."""
        import botocore.session
        return botocore.session.get_session().create_client(
            service, endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup")

    def add_user(self):
        """An IAM user allowed everything on S3: its AWS_* environment."""
        iam = self.client("iam")
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": "us-east-1"}

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@pytest.fixture(scope="module")
def fronted():
    m = FrontedMoto()
    try:
        m.env = m.add_user()
        s3 = m.client("s3")
        s3.create_bucket(Bucket="signed")
        s3.put_object(Bucket="signed", Key="new/a.bin", Body=b"0123456789")
        s3.put_object(Bucket="signed", Key="odd name/b c.bin", Body=b"abcdefghij")
        yield m
    finally:
        m.close()


@pytest.fixture
def fronted_env(fronted, monkeypatch):
    from moto.core.authorization import enable_iam_authentication
    _use_env(monkeypatch, fronted.env)
    with enable_iam_authentication():
        yield fronted


def test_a_redirect_on_the_endpoint_is_signed_for_its_new_path(fronted_env):
    """An s3:// read that the endpoint redirects to another key of its own: the
    follow-up is signed afresh for that key, and moto, checking every signature
    against the user's secret as S3 does, serves it (the old signature, made for
    the old path, would be refused: 403 SignatureDoesNotMatch)."""
    import httpx
    m = fronted_env
    f = Fetcher()
    assert f.read("s3://signed/new/a.bin") == b"0123456789"
    url, headers = f.prepare("s3://signed/old/a.bin", {})      # signed for another path:
    refused = httpx.get(url.replace("/old/", "/new/"), headers=headers)
    assert refused.status_code == 403 and b"SignatureDoesNotMatch" in refused.content
    m.answers["/signed/old/a.bin"] = ("307 Temporary Redirect",
                                      [("Location", "/signed/new/a.bin")])
    m.answers["/signed/moved.bin"] = ("301 Moved Permanently",
                                      [("Location", f"{m.url}/signed/odd%20name/b%20c.bin")])
    assert f.read("s3://signed/old/a.bin") == b"0123456789"
    assert f.read(Member("s3://signed/old/a.bin", 3, 4)) == b"3456"
    assert b"".join(f.stream("s3://signed/old/a.bin")) == b"0123456789"
    assert f.size("s3://signed/moved.bin") == 10
    assert f.read(Member("s3://signed/moved.bin", 2, 3)) == b"cde"
    assert not f.retried


@pytest.mark.parametrize("status, body_reason, reason", [
    ("301 Moved Permanently", "PermanentRedirect", "redirect"),
    ("400 Bad Request", "AuthorizationHeaderMalformed", "http_4xx"),
])
def test_a_bucket_in_another_region_is_named_in_the_error(fronted_env, status, body_reason,
                                                          reason):
    """S3's answer to a request signed for the wrong region -- a 301 without a
    Location, or a 400, with ``x-amz-bucket-region`` -- fails at once, naming the
    bucket's region and how to choose it; no secret in the message."""
    m = fronted_env
    body = (f"<Error><Code>{body_reason}</Code><Message>...</Message>"
            "<Region>eu-west-1</Region></Error>").encode()
    m.answers["/elsewhere/k.jpg"] = (status, [("x-amz-bucket-region", "eu-west-1"),
                                              ("Content-Type", "application/xml")], body)
    f = Fetcher()
    for read in (f.read, lambda loc: b"".join(f.stream(loc)), f.size):
        with pytest.raises(FetchError) as e:
            read("s3://elsewhere/k.jpg")
        assert str(e.value) == ("s3://elsewhere/k.jpg: the bucket is in region eu-west-1, "
                                "not us-east-1 (set AWS_REGION=eu-west-1)")
        assert (e.value.reason, e.value.status, e.value.attempts) == (
            reason, int(status[:3]), 1)
        assert m.env["AWS_SECRET_ACCESS_KEY"] not in str(e.value) + repr(e.value)
    # the same answer without the header, or naming the region asked: as before
    m.answers["/elsewhere/k.jpg"] = (status, [("x-amz-bucket-region", "us-east-1")])
    m.answers["/elsewhere/none.jpg"] = (status, [])
    for path in ("/elsewhere/k.jpg", "/elsewhere/none.jpg"):
        with pytest.raises(FetchError) as e:
            f.read(f"s3:/{path}")
        assert str(e.value) == f"s3:/{path}: HTTP {status[:3]}" + (
            " without a Location to follow" if reason == "redirect" else "")
