"""s3:// locations against moto's S3 server on loopback: SigV4 from botocore, the
standard AWS_* environment, range reads, index and WebDataset sources."""

from __future__ import annotations

import json

import pytest

import botocore  # noqa: F401  (test dependencies: setup.sh installs them; fail if absent)
import moto  # noqa: F401

from datago import DatagoDataset
from datago.fetch import FetchError, Fetcher, Member
from servers import MotoS3
from test_webdataset import IMAGE, by_key, make_folder, make_shards, wds_cfg


@pytest.fixture(scope="module")
def s3():
    with MotoS3() as m:
        yield m


@pytest.fixture
def aws_env(s3, monkeypatch):
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
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
