"""``datago serve``: the dataroom-compatible API and file server, over real HTTP.

One fixture folder (30 images of varied sizes with masks, additional images,
latents and sidecars, plus two samples that must be left out) is served by real
``python -m datago serve`` processes; every expectation is computed here from
what the fixture wrote, not from the server's code.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import io
import json
import tarfile
import urllib.parse

import httpx
import numpy as np
import pytest
import xxhash
from PIL import Image

from conftest import encode, photo
from servers import DatagoServe

TOKEN = "s3cret-Tok3n"
SOURCE = "photos"
ALL_FIELDS = {"id", "source", "image_direct_url", "width", "height", "short_edge",
              "pixel_count", "aspect_ratio", "tags", "attributes", "duplicate_state",
              "image_hash", "coca_embedding", "latents"}
TAG_CHOICES = (["cat"], ["dog"], ["cat", "dog"], ["outdoor", "cat"], [], "cat")


# ---------------------------------------------------------------------------
# fixture data
# ---------------------------------------------------------------------------

def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_folder(root):
    """30 samples; returns {id: expected metadata} (the two bad samples excluded)."""
    exp = {}
    for k in range(30):
        key = f"sub/img{k:02d}" if k >= 24 else f"img{k:02d}"
        ext = "png" if k % 3 == 2 else "jpg"
        w, h = 20 + (k * 7) % 41, 18 + (k * 11) % 37
        im = Image.fromarray(photo(w, h, seed=k))
        if k == 1:                                      # EXIF orientation 6: shown rotated
            exif = Image.Exif()
            exif[0x0112] = 6
            data = encode(im, "JPEG", exif=exif.tobytes())
            w, h = h, w
        else:
            data = encode(im, "PNG" if ext == "png" else "JPEG")
        sid = f"{key}.{ext}"
        files = {("image", ""): data}
        _write(root / sid, data)
        masks, images, latents = set(), set(), set()
        if k % 4 == 0:
            files[("mask", "mask")] = encode(Image.new("L", (w, h), k), "PNG")
            _write(root / f"{key}.mask.png", files[("mask", "mask")])
            masks.add("mask")
        if k % 6 == 0:
            files[("mask", "seg")] = encode(Image.new("L", (w, h), 3), "PNG")
            _write(root / f"{key}.seg.png", files[("mask", "seg")])
            masks.add("seg")
        if k % 5 == 0:
            files[("image", "masked_image")] = encode(Image.new("RGB", (w, h), (k, 0, 0)), "PNG")
            _write(root / f"{key}.masked_image.png", files[("image", "masked_image")])
            images.add("masked_image")
        if k % 3 == 0:
            buf = io.BytesIO()
            np.save(buf, np.full((4, 2, 3), k, np.float16))
            files[("latent", "vae")] = buf.getvalue()
            _write(root / f"{key}.vae.npy", files[("latent", "vae")])
            latents.add("vae")
        if k % 7 == 0:
            buf = io.BytesIO()
            np.save(buf, np.arange(k + 1, dtype=np.int32))
            files[("latent", "npy")] = buf.getvalue()
            _write(root / f"{key}.npy", files[("latent", "npy")])
            latents.add("npy")
        attrs = {}
        if k % 2 == 0:
            j = {"tags": TAG_CHOICES[(k // 2) % len(TAG_CHOICES)], "score": k / 10,
                 "label": f"lab{k % 4}", "code": str(k)}
            if k % 8 != 6:
                j["duplicate_state"] = 1 + (k // 2) % 2
            else:
                j["duplicate_state"] = "2"                  # not an int: null
            _write(root / f"{key}.json", json.dumps(j).encode())
            attrs.update(j)
        if k % 3 == 1:
            _write(root / f"{key}.txt", f"caption {k}".encode())
            attrs["txt"] = f"caption {k}"
        if k % 5 == 1:
            meta = {"k": k, "ok": k % 2 == 0}
            _write(root / f"{key}.meta.json", json.dumps(meta).encode())
            attrs["meta"] = meta
        t = attrs.get("tags")
        tags = list(t) if isinstance(t, list) else []
        d = attrs.get("duplicate_state")
        exp[sid] = {"id": sid, "width": w, "height": h, "attributes": attrs, "tags": tags,
                    "duplicate_state": d if isinstance(d, int) else None,
                    "masks": masks, "images": images, "latent_names": latents,
                    "types": masks | images | latents, "files": files}
    _write(root / "broken.jpg", b"\xff\xd8 not a jpeg at all")            # unreadable header
    _write(root / "badjson.png", encode(Image.new("RGB", (9, 9)), "PNG"))
    _write(root / "badjson.json", b"{not json")                          # bad sidecar
    return exp


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve") / SOURCE
    root.mkdir()
    exp = make_folder(root)
    return root, exp


def _index_config(base, remote_url):
    """A CSV index of three local files (relative paths) and one URL (a file of
    another server), and its config file."""
    folder = base / "idx"
    folder.mkdir()
    rows = []
    for k, (w, h) in enumerate([(31, 17), (12, 40), (25, 25)]):
        name = f"pic{k}.png"
        (folder / name).write_bytes(encode(photo(w, h, seed=100 + k), "PNG"))
        rows.append((name, f"label{k}", w, h))
    (folder / "index.csv").write_text("url,label,animal\n" + "".join(
        f"{n},{lab},{'cat' if k != 1 else 'dog'}\n" for k, (n, lab, _, _) in enumerate(rows))
        + f"{remote_url},remote,dog\n")
    cfg = base / "myindex.json"
    cfg.write_text(json.dumps({"source_type": "index",
                               "source_config": {"index": str(folder / "index.csv")}}))
    return cfg, folder, rows


def _wds_config(base):
    """A local tar shard of 3 samples (image, mask, latent, json) with its index."""
    from datago.sources.webdataset import write_index
    folder = base / "wds"
    folder.mkdir()
    members = {}
    for k in range(3):
        members[f"s{k}.jpg"] = encode(photo(30 + k, 20, seed=200 + k), "JPEG")
        members[f"s{k}.mask.png"] = encode(Image.new("L", (30 + k, 20), 7), "PNG")
        members[f"s{k}.json"] = json.dumps({"n": k, "tags": ["w"]}).encode()
        buf = io.BytesIO()
        np.save(buf, np.full((3, 3), k, np.float32))
        members[f"s{k}.vae.npy"] = buf.getvalue()
    shard = folder / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    write_index(str(shard))
    cfg = base / "shards.json"
    cfg.write_text(json.dumps({"source_type": "webdataset",
                               "source_config": {"url": str(shard)}}))
    return cfg, members


@pytest.fixture(scope="module")
def servers(data, tmp_path_factory):
    """All servers of the module, started together (start-up is mostly imports)."""
    root, exp = data
    base = tmp_path_factory.mktemp("serve-cfg")
    cache = base / "sizes-cache"
    wcfg, wmembers = _wds_config(base)
    srv = {"auth": DatagoServe(root, token=TOKEN, cache_dir=cache),
           "open": DatagoServe(root, source="other-name", cache_dir=base / "c2",
                               extra_args=["--page-size-max", "10"]),
           "wds": DatagoServe(None, config=wcfg)}
    try:
        for s in srv.values():          # launched from this thread: they die with it
            s.launch()
        srv["open"].wait()
        # the index lists one sample by URL: a file of the open server (read through
        # the index server's fetcher)
        first = httpx.get(srv["open"].api_url + "images/",
                          params={"page_size": 1, "fields": "image_direct_url"}).json()
        remote = first["results"][0]["image_direct_url"]
        icfg, ifolder, irows = _index_config(base, remote)
        srv["index"] = DatagoServe(None, config=icfg, token=TOKEN).launch()
        for s in srv.values():
            s.wait()
    except BaseException:
        for s in srv.values():
            s.close()
        raise
    srv["_cache"] = cache
    srv["_index"] = (ifolder, irows, remote, exp[sorted(exp)[0]]["files"][("image", "")])
    srv["_wds"] = wmembers
    yield srv
    for s in list(srv.values()):
        if isinstance(s, DatagoServe):
            s.close()


@pytest.fixture(scope="module")
def client():
    with httpx.Client(headers={"Authorization": f"Token {TOKEN}"}, timeout=30) as c:
        yield c


def _all(client, api_url, params=None, page_size=7):
    """Every result following ``next``; also checks each page's size and next."""
    params = dict(params or {})
    params["page_size"] = page_size
    r = client.get(api_url + "images/", params=params)
    out = []
    pages = 0
    while True:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["previous"] is None
        assert len(body["results"]) <= page_size
        out += body["results"]
        pages += 1
        assert pages < 1000
        if body["next"] is None:
            return out
        r = client.get(body["next"])


def _ids(results):
    return [r["id"] for r in results]


# ---------------------------------------------------------------------------
# listing, paging, fields
# ---------------------------------------------------------------------------

def test_start_line_and_cache(servers, data):
    _, exp = data
    s = servers["auth"]
    assert s.stdout_text() == f"datago serve: {s.api_url} ({len(exp)} samples, source {SOURCE})\n"
    assert "no token" not in s.stderr_text()
    assert "left out 1 bad attributes, 1 unreadable image" in s.stderr_text()
    assert list(servers["_cache"].glob("sizes-*.npz"))            # --cache-dir used
    o = servers["open"]
    assert o.stdout_text() == f"datago serve: {o.api_url} ({len(exp)} samples, source other-name)\n"
    assert "warning: no token" in o.stderr_text()


@pytest.mark.parametrize("page_size", [1, 7, 2000])
def test_paging_every_sample_once_in_id_order(servers, client, data, page_size):
    _, exp = data
    got = _all(client, servers["auth"].api_url, page_size=page_size)
    assert _ids(got) == sorted(exp)
    assert "broken.jpg" not in _ids(got) and "badjson.png" not in _ids(got)


def test_next_url_keeps_params_and_replaces_cursor(servers, client, data):
    _, exp = data
    api = servers["auth"].api_url
    r = client.get(api + "images", params={"page_size": 4, "fields": "id,width", "tags__empty": "false"})
    body = r.json()
    nxt = urllib.parse.urlsplit(body["next"])
    q = urllib.parse.parse_qs(nxt.query)
    assert f"{nxt.scheme}://{nxt.netloc}" == servers["auth"].url and nxt.path == "/api/images"
    assert q["page_size"] == ["4"] and q["fields"] == ["id,width"] and q["tags__empty"] == ["false"]
    assert len(q["cursor"]) == 1
    r2 = client.get(body["next"])
    q2 = urllib.parse.parse_qs(urllib.parse.urlsplit(r2.json()["next"]).query)
    assert len(q2["cursor"]) == 1 and q2["cursor"] != q["cursor"]
    want = [s for s in sorted(exp) if exp[s]["tags"]]
    assert _ids(body["results"]) + _ids(r2.json()["results"]) == want[:8]
    assert all(set(x) == {"id", "width"} for x in body["results"])


def test_full_objects(servers, client, data):
    _, exp = data
    got = {r["id"]: r for r in _all(client, servers["auth"].api_url, page_size=2000)}
    for sid, e in exp.items():
        r = got[sid]
        assert set(r) == ALL_FIELDS
        w, h = e["width"], e["height"]
        assert (r["width"], r["height"]) == (w, h), sid
        assert r["short_edge"] == min(w, h) and r["pixel_count"] == w * h
        assert r["aspect_ratio"] == pytest.approx(w / h)
        assert r["source"] == SOURCE
        assert r["attributes"] == e["attributes"], sid
        assert r["tags"] == e["tags"]
        assert r["duplicate_state"] == e["duplicate_state"]
        assert r["coca_embedding"] is None
        assert r["image_hash"] == "sha256:" + hashlib.sha256(e["files"][("image", "")]).hexdigest()
        lat = {(x["kind"], x["latent_type"]): x for x in r["latents"]}
        assert len(lat) == len(r["latents"])
        assert set(lat) == {k for k in e["files"] if k != ("image", "")}
        for (kind, name), x in lat.items():
            assert x["is_mask"] == (kind == "mask")
    # the EXIF-rotated JPEG is reported with its displayed size
    assert (got["img01.jpg"]["width"], got["img01.jpg"]["height"]) == (29, 27)


def test_fields_and_return_latents(servers, client, data):
    _, exp = data
    api = servers["auth"].api_url
    r = client.get(api + "images/", params={"fields": "id", "page_size": 3}).json()
    assert [set(x) for x in r["results"]] == [{"id"}] * 3
    r = client.get(api + "images/", params={"fields": "width,bogus,tags", "page_size": 3}).json()
    assert [set(x) for x in r["results"]] == [{"id", "width", "tags"}] * 3
    r = client.get(api + "images/", params={"fields": "latents", "return_latents": "mask,vae",
                                            "page_size": 2000}).json()
    for x in r["results"]:
        e = exp[x["id"]]
        assert sorted(l["latent_type"] for l in x["latents"]) == \
            sorted(e["types"] & {"mask", "vae"})


# ---------------------------------------------------------------------------
# filters
# ---------------------------------------------------------------------------

def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


FILTERS = [
    ({"tags": "cat,outdoor"}, lambda e: bool({"cat", "outdoor"} & set(e["tags"]))),
    ({"tags__all": "cat,dog"}, lambda e: {"cat", "dog"} <= set(e["tags"])),
    ({"tags__ne": "cat"}, lambda e: "cat" not in e["tags"]),
    ({"tags__ne_all": "cat,dog"}, lambda e: not {"cat", "dog"} <= set(e["tags"])),
    ({"tags__empty": "true"}, lambda e: not e["tags"]),
    ({"tags__empty": "false"}, lambda e: bool(e["tags"])),
    ({"sources": f"x,{SOURCE}"}, lambda e: True),
    ({"sources": "x,y"}, lambda e: False),
    ({"sources__ne": SOURCE}, lambda e: False),
    ({"sources__ne": "x"}, lambda e: True),
    ({"has_attributes": "score,txt"}, lambda e: {"score", "txt"} <= set(e["attributes"])),
    ({"has_attributes": "meta"}, lambda e: "meta" in e["attributes"]),
    ({"lacks_attributes": "score,txt"}, lambda e: not {"score", "txt"} & set(e["attributes"])),
    ({"has_masks": "mask"}, lambda e: "mask" in e["masks"]),
    ({"has_masks": "mask,seg"}, lambda e: {"mask", "seg"} <= e["masks"]),
    ({"lacks_masks": "seg"}, lambda e: "seg" not in e["masks"]),
    ({"has_latents": "vae,masked_image"}, lambda e: {"vae", "masked_image"} <= e["types"]),
    ({"has_latents": "mask"}, lambda e: "mask" in e["types"]),
    ({"has_latents": "npy"}, lambda e: "npy" in e["types"]),
    ({"lacks_latents": "vae,seg"}, lambda e: not {"vae", "seg"} & e["types"]),
    ({"short_edge__gte": "30"}, lambda e: min(e["width"], e["height"]) >= 30),
    ({"short_edge__lte": "25"}, lambda e: min(e["width"], e["height"]) <= 25),
    ({"pixel_count__gte": "1000", "pixel_count__lte": "1800"},
     lambda e: 1000 <= e["width"] * e["height"] <= 1800),
    ({"duplicate_state": "2"}, lambda e: e["duplicate_state"] == 2),
    ({"duplicate_state": "1"}, lambda e: e["duplicate_state"] == 1),
    ({"attributes": "score__gte:1.5"}, lambda e: e["attributes"].get("score", -1) >= 1.5),
    ({"attributes": "score__lt:1"}, lambda e: "score" in e["attributes"] and e["attributes"]["score"] < 1),
    ({"attributes": "label:lab2"}, lambda e: e["attributes"].get("label") == "lab2"),
    ({"attributes": "label__eq:lab0"}, lambda e: e["attributes"].get("label") == "lab0"),
    ({"attributes": "label__ne:lab2"}, lambda e: e["attributes"].get("label") != "lab2"),
    ({"attributes": "label__gt:lab0"}, lambda e: e["attributes"].get("label", "") > "lab0"),
    ({"attributes": "txt__prefix:caption 1"},
     lambda e: e["attributes"].get("txt", "").startswith("caption 1")),
    # "code" holds numeric strings: compared as numbers ("10" > "9"), not as text
    ({"attributes": "code__gt:9"}, lambda e: "code" in e["attributes"] and int(e["attributes"]["code"]) > 9),
    ({"attributes": "code__lte:4"}, lambda e: "code" in e["attributes"] and int(e["attributes"]["code"]) <= 4),
    ({"attributes": "score__gt:0.5,label:lab2"},
     lambda e: e["attributes"].get("score", 0) > 0.5 and e["attributes"].get("label") == "lab2"),
    ({"attributes": "tags:dog"}, lambda e: "dog" in e["tags"]),
    ({"tags": "cat", "short_edge__gte": "20", "lacks_masks": "mask"},
     lambda e: "cat" in e["tags"] and min(e["width"], e["height"]) >= 20 and "mask" not in e["masks"]),
]


@pytest.mark.parametrize("params,pred", FILTERS, ids=[json.dumps(p) for p, _ in FILTERS])
def test_filter(servers, client, data, params, pred):
    _, exp = data
    want = sorted(s for s, e in exp.items() if pred(e))
    assert _ids(_all(client, servers["auth"].api_url, params)) == want


def test_filters_are_not_trivial(data):
    """Each filter of FILTERS keeps a proper subset, all, or none as intended (guards the
    fixture: a filter test that keeps everything could not catch a filter ignored)."""
    _, exp = data
    sizes = {json.dumps(p): sum(1 for e in exp.values() if pred(e)) for p, pred in FILTERS}
    everything = {json.dumps({"sources": f"x,{SOURCE}"}), json.dumps({"sources__ne": "x"})}
    nothing = {json.dumps({"sources": "x,y"}), json.dumps({"sources__ne": SOURCE})}
    for k, n in sizes.items():
        if k in everything:
            assert n == len(exp)
        elif k in nothing:
            assert n == 0
        else:
            assert 0 < n < len(exp), k


def _part(sid, count):
    return xxhash.xxh64_intdigest(sid.encode()) % count


@pytest.mark.parametrize("count", [1, 3, 5])
def test_partitions_disjoint_complete(servers, client, data, count):
    _, exp = data
    seen = []
    for k in range(count):
        got = _ids(_all(client, servers["auth"].api_url,
                        {"partitions_count": count, "partition": k}))
        assert got == sorted(s for s in exp if _part(s, count) == k)
        seen += got
    assert sorted(seen) == sorted(exp) and len(set(seen)) == len(seen)


def test_partition_with_filter(servers, client, data):
    _, exp = data
    got = _ids(_all(client, servers["auth"].api_url,
                    {"partitions_count": 3, "partition": 1, "has_latents": "vae"}))
    assert got == sorted(s for s, e in exp.items() if _part(s, 3) == 1 and "vae" in e["types"])


# ---------------------------------------------------------------------------
# random
# ---------------------------------------------------------------------------

def test_random(servers, client, data):
    _, exp = data
    api = servers["auth"].api_url
    match = {s for s, e in exp.items() if "cat" in e["tags"] or "mask" in e["masks"]}
    assert 5 < len(match) < len(exp)
    orders = set()
    for _ in range(6):
        r = client.get(api + "images/random/", params={"page_size": 5, "tags": "cat"}).json()
        ids = _ids(r["results"])
        assert r["next"] is None and len(ids) == 5 and len(set(ids)) == 5
        assert all("cat" in exp[i]["tags"] for i in ids)
        orders.add(tuple(ids))
    assert len(orders) > 1                                  # drawn, not the first five
    r = client.get(api + "images/random", params={"page_size": 2000, "has_masks": "mask",
                                                  "fields": "id,latents"}).json()
    assert r["next"] is None
    assert sorted(_ids(r["results"])) == sorted(s for s, e in exp.items() if "mask" in e["masks"])
    assert all(set(x) == {"id", "latents"} for x in r["results"])
    r = client.get(api + "images/random/", params={"page_size": 2000, "partitions_count": 5,
                                                   "partition": 2}).json()
    assert sorted(_ids(r["results"])) == sorted(s for s in exp if _part(s, 5) == 2)
    r = client.get(api + "images/random/", params={"sources": "nope"}).json()
    assert r == {"next": None, "previous": None, "results": []}


# ---------------------------------------------------------------------------
# auth, errors
# ---------------------------------------------------------------------------

def test_auth(servers, client):
    api = servers["auth"].api_url
    for path in ("images/", "images/random/"):
        r = httpx.get(api + path)
        assert r.status_code == 401 and set(r.json()) == {"detail"}
        r = httpx.get(api + path, headers={"Authorization": "Token wrong-one"})
        assert r.status_code == 401 and set(r.json()) == {"detail"}
        assert "wrong-one" not in r.text and TOKEN not in r.text
        r = httpx.get(api + path, headers={"Authorization": TOKEN})           # no scheme
        assert r.status_code == 401
        r = httpx.get(api + path, headers={"Authorization": f"Token {TOKEN}x"})
        assert r.status_code == 401
        assert httpx.get(api + path, headers={"Authorization": f"Token {TOKEN}"}).status_code == 200
        assert httpx.get(api + path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    # 401 comes before parameter checks
    assert httpx.get(api + "images/?page_size=x").status_code == 401


@pytest.mark.parametrize("params", [
    {"page_size": "abc"}, {"page_size": "1.5"}, {"cursor": "garbage!"}, {"cursor": "ZGcxOjk5OTk"},
    {"partitions_count": "3"}, {"partition": "1"}, {"partitions_count": "3", "partition": "3"},
    {"partitions_count": "3", "partition": "-1"}, {"partitions_count": "0", "partition": "0"},
    {"partitions_count": "x", "partition": "0"}, {"attributes": "score__foo:1"},
    {"attributes": "score"}, {"duplicate_state": "x"}, {"short_edge__gte": "big"},
    {"pixel_count__lte": "nan"}, {"tags__empty": "maybe"},
])
def test_bad_params_400(servers, client, params):
    for path in ("images/", "images/random/"):
        if "cursor" in params and "random" in path:
            continue
        r = client.get(servers["auth"].api_url + path, params=params)
        assert r.status_code == 400, (path, params, r.text)
        assert r.headers["content-type"] == "application/json"
        assert set(r.json()) == {"detail"} and r.json()["detail"]


def test_page_size_clamped(servers, client, data):
    _, exp = data
    api = servers["auth"].api_url
    assert len(client.get(api + "images/", params={"page_size": 0}).json()["results"]) == 1
    assert len(client.get(api + "images/", params={"page_size": -5}).json()["results"]) == 1
    assert len(client.get(api + "images/").json()["results"]) == len(exp)       # default 100
    o = servers["open"].api_url                                   # --page-size-max 10
    r = httpx.get(o + "images/", params={"page_size": 50}).json()
    assert len(r["results"]) == 10 and r["next"] is not None
    r = httpx.get(o + "images/random/", params={"page_size": 50}).json()
    assert len(r["results"]) == 10


def test_methods_and_unknown_paths(servers, client):
    s = servers["auth"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = client.request(method, s.api_url + "images/")
        assert r.status_code == 405 and r.json()["detail"]
        r = client.request(method, s.url + "/files/0/image/x.jpg")
        assert r.status_code == 405
    r = client.head(s.api_url + "images/", params={"page_size": 3, "fields": "id"})
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == len(
        client.get(s.api_url + "images/", params={"page_size": 3, "fields": "id"}).content)
    for path in ("/", "/api/", "/api/images/x/", "/nope", "/files/0", "/files/0/other/a/b.jpg"):
        r = client.get(s.url + path)
        assert r.status_code == 404 and r.json() == {"detail": "Not found."}, path


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------

def _sig(path_part):
    return hmac.new(TOKEN.encode(), path_part.encode(), hashlib.sha256).hexdigest()[:32]


def test_file_urls_signed_without_auth(servers, client, data):
    _, exp = data
    s = servers["auth"]
    results = _all(client, s.api_url, {"fields": "image_direct_url,latents"}, page_size=2000)
    plain = httpx.Client(timeout=30)                             # no Authorization header
    n = 0
    for r in results:
        e = exp[r["id"]]
        urls = [(("image", ""), r["image_direct_url"])] + \
            [((x["kind"], x["latent_type"]), x["file_direct_url"]) for x in r["latents"]]
        for part, url in urls:
            u = urllib.parse.urlsplit(url)
            assert f"{u.scheme}://{u.netloc}" == s.url
            segs = u.path.split("/")
            i = segs[2]
            want_part = "image" if part == ("image", "") else f"{part[0]}/{part[1]}"
            assert u.path == f"/files/{i}/{want_part}/{segs[-1]}"
            assert u.query == f"s={_sig(f'{i}/{want_part}')}"
            # the basename is the file's own name: the URL ends in its extension
            key = r["id"].rsplit(".", 1)[0].rsplit("/", 1)[-1]
            if part == ("image", ""):
                assert segs[-1] == r["id"].rsplit("/", 1)[-1]
            elif part == ("latent", "npy"):
                assert segs[-1] == f"{key}.npy"
            else:
                assert segs[-1] == f"{key}.{part[1]}.{'npy' if part[0] == 'latent' else 'png'}"
            got = plain.get(url)
            assert got.status_code == 200, url
            assert got.content == e["files"][part]
            assert got.headers.get("etag")
            # no / wrong / other part's signature: 403
            bare = url.split("?")[0]
            assert plain.get(bare).status_code == 403
            assert plain.get(bare + "?s=" + "0" * 32).status_code == 403
            assert plain.get(bare + "?s=" + _sig(f"{int(i) + 1}/{want_part}")).status_code == 403
            n += 1
    plain.close()
    assert n == sum(len(e["files"]) for e in exp.values())


def test_file_range_and_etag(servers, client, data):
    _, exp = data
    s = servers["auth"]
    r = client.get(s.api_url + "images/", params={"fields": "image_direct_url", "page_size": 1}).json()
    url = r["results"][0]["image_direct_url"]
    full = exp[r["results"][0]["id"]]["files"][("image", "")]
    a = httpx.get(url)
    assert a.status_code == 200 and a.content == full
    assert a.headers["accept-ranges"] == "bytes"
    assert a.headers["content-type"] == "image/jpeg"
    b = httpx.get(url, headers={"Range": "bytes=5-14"})
    assert b.status_code == 206 and b.content == full[5:15]
    assert b.headers["content-range"] == f"bytes 5-14/{len(full)}"
    assert b.headers["etag"] == a.headers["etag"]
    c = httpx.get(url, headers={"Range": "bytes=-7"})
    assert c.status_code == 206 and c.content == full[-7:]
    d = httpx.get(url, headers={"Range": f"bytes={len(full) + 10}-"})
    assert d.status_code == 416
    assert httpx.head(url).headers["content-length"] == str(len(full))
    # a valid signature for a sample that does not exist, and a wrong basename: 404
    assert httpx.get(f"{s.url}/files/9999/image/x.jpg?s={_sig('9999/image')}").status_code == 404
    i = urllib.parse.urlsplit(url).path.split("/")[2]
    assert httpx.get(f"{s.url}/files/{i}/image/other.jpg?s={_sig(f'{i}/image')}").status_code == 404
    assert httpx.get(f"{s.url}/files/{i}/mask/nope/x.png?s={_sig(f'{i}/mask/nope')}").status_code == 404


def test_open_server(servers, data):
    """No token: the API and the files need nothing."""
    _, exp = data
    o = servers["open"]
    r = httpx.get(o.api_url + "images/", params={"page_size": 10, "fields": "image_direct_url,source"})
    assert r.status_code == 200
    res = r.json()["results"]
    assert all(x["source"] == "other-name" for x in res)
    assert _ids(res) == sorted(exp)[:10]
    for x in res:
        assert "?" not in x["image_direct_url"]
        got = httpx.get(x["image_direct_url"])
        assert got.status_code == 200 and got.content == exp[x["id"]]["files"][("image", "")]
    with httpx.Client() as c:
        assert _ids(_all(c, o.api_url, {"sources": "other-name"})) == sorted(exp)
        assert _ids(_all(c, o.api_url, {"sources": SOURCE})) == []


def test_64_concurrent_clients(servers, data):
    _, exp = data
    api = servers["auth"].api_url

    def one(_):
        with httpx.Client(headers={"Authorization": f"Token {TOKEN}"}, timeout=60) as c:
            return _ids(_all(c, api, {"fields": "id,latents,attributes"}, page_size=7))

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(64)))
    want = sorted(exp)
    assert all(g == want for g in got)


# ---------------------------------------------------------------------------
# other sources (--config)
# ---------------------------------------------------------------------------

def test_index_config_server(servers, client):
    s = servers["index"]
    folder, rows, remote, remote_bytes = servers["_index"]
    assert s.stdout_text() == f"datago serve: {s.api_url} (4 samples, source myindex)\n"
    assert httpx.get(s.api_url + "images/").status_code == 401
    got = _all(client, s.api_url, page_size=2)
    assert _ids(got) == sorted([n for n, *_ in rows] + [remote])
    by = {r["id"]: r for r in got}
    for k, (name, label, w, h) in enumerate(rows):
        r = by[name]
        assert (r["width"], r["height"]) == (w, h)
        assert r["attributes"] == {"label": label, "animal": "cat" if k != 1 else "dog"}
        assert r["source"] == "myindex" and r["latents"] == []
        assert urllib.parse.urlsplit(r["image_direct_url"]).path.endswith(f"/image/{name}")
        f = httpx.get(r["image_direct_url"])
        assert f.status_code == 200 and f.content == (folder / name).read_bytes()
    assert _ids(_all(client, s.api_url, {"attributes": "animal:dog"})) == sorted(["pic1.png", remote])
    # the sample behind a URL: read through the fetcher, with Range, ETag, If-None-Match
    r = by[remote]
    assert r["attributes"] == {"label": "remote", "animal": "dog"}
    assert r["image_hash"] == "sha256:" + hashlib.sha256(remote_bytes).hexdigest()
    url = r["image_direct_url"]
    assert urllib.parse.urlsplit(url).path.endswith("/image/img00.jpg")
    with httpx.Client() as c:
        a = c.get(url)
        assert a.status_code == 200 and a.content == remote_bytes
        assert a.headers["content-type"] == "image/jpeg"
        b = c.get(url, headers={"Range": "bytes=10-19"})
        assert b.status_code == 206 and b.content == remote_bytes[10:20]
        assert b.headers["content-range"] == f"bytes 10-19/{len(remote_bytes)}"
        assert b.headers["etag"] == a.headers["etag"]
        assert c.get(url, headers={"If-None-Match": a.headers["etag"]}).status_code == 304
        assert c.get(url, headers={"Range": f"bytes={len(remote_bytes)}-"}).status_code == 416
        assert c.get(url.split("?")[0]).status_code == 403


def test_webdataset_config_server(servers):
    """Parts inside a tar are read by offset through the fetcher, with Range and ETag."""
    s = servers["wds"]
    members = servers["_wds"]
    c = httpx.Client()
    got = _all(c, s.api_url, page_size=2)
    assert _ids(got) == ["s0", "s1", "s2"]
    for r in got:
        k = r["id"]
        assert r["attributes"] == {"n": int(k[1]), "tags": ["w"]} and r["tags"] == ["w"]
        assert r["width"] == 30 + int(k[1]) and r["height"] == 20
        assert {(x["kind"], x["latent_type"]) for x in r["latents"]} == {("mask", "mask"), ("latent", "vae")}
        urls = {x["latent_type"]: x["file_direct_url"] for x in r["latents"]}
        assert r["image_direct_url"].endswith(f"/image/{k}.jpg")
        for url, name in ((r["image_direct_url"], f"{k}.jpg"), (urls["mask"], f"{k}.mask.png"),
                          (urls["vae"], f"{k}.vae.npy")):
            full = members[name]
            a = c.get(url)
            assert a.status_code == 200 and a.content == full
            etag = a.headers["etag"]
            b = c.get(url, headers={"Range": "bytes=3-9"})
            assert b.status_code == 206 and b.content == full[3:10]
            assert b.headers["content-range"] == f"bytes 3-9/{len(full)}" and b.headers["etag"] == etag
            t = c.get(url, headers={"Range": "bytes=-4"})
            assert t.status_code == 206 and t.content == full[-4:]
            assert c.get(url, headers={"Range": f"bytes={len(full)}-"}).status_code == 416
            assert c.get(url, headers={"If-None-Match": etag}).status_code == 304
            several = c.get(url, headers={"Range": "bytes=0-1,4-5"})      # several: all of it
            assert several.status_code == 200 and several.content == full
    c.close()


def test_cli_usage_errors(tmp_path, capsys):
    from datago.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--config", "x.json"])
    assert e.value.code == 2
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "datago serve:" in capsys.readouterr().err
    bad = tmp_path / "db.json"
    bad.write_text("{not json")
    assert main(["serve", "--config", str(bad)]) == 2


def test_the_listening_socket_is_tcp_so_responses_are_not_delayed():
    """asyncio sets TCP_NODELAY on accepted sockets only when the listening socket's
    protocol is IPPROTO_TCP (a socket made with protocol 0 made every keep-alive
    response wait ~40 ms for a delayed ACK)."""
    import socket
    from datago.serve import _bind
    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.type == socket.SOCK_STREAM
    finally:
        sock.close()


def test_a_zip_member_that_fails_its_crc_is_a_502(tmp_path):
    """Served from a ZIP source, a whole member is read with its CRC-32 checked: a
    stored JPEG with one changed byte (it would still decode) is refused, not sent."""
    import zipfile
    good, bad = encode(photo(40, 30, seed=1), "JPEG"), encode(photo(40, 30, seed=2), "JPEG")
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("good.jpg", good)
        z.writestr("bad.jpg", bad)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"\xff\xdb", raw.index(bad)) + 15] ^= 0x01      # a quantisation step
    path.write_bytes(bytes(raw))
    cfg = tmp_path / "zip.json"
    cfg.write_text(json.dumps({"source_type": "zip", "source_config": {"path": str(path)}}))
    with DatagoServe(None, config=cfg) as srv, httpx.Client(timeout=30) as c:
        rows = c.get(srv.api_url + "images/", params={"fields": "id,image_direct_url"}).json()
        urls = {r["id"]: r["image_direct_url"] for r in rows["results"]}
        assert c.get(urls["good.jpg"]).content == good
        r = c.get(urls["bad.jpg"])
        assert r.status_code == 502 and "CRC-32" in r.text
