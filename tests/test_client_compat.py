"""DatagoClient as a drop-in for the reference datago: Ctrl-C while waiting,
``compat=True``, and the same fields as the reference on the same files (when the
reference is installed in its own venv, ``$DATAGO_REF_VENV``, default
/tmp/datago_ref; skipped otherwise, never installed here)."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import datago
from datago import DatagoClient
from conftest import encode, photo

IMAGE = {"crop_and_resize": True, "default_image_size": 128, "downsampling_ratio": 16,
         "min_aspect_ratio": 0.5, "max_aspect_ratio": 2.0}
SIZES = [(200, 120), (90, 160), (128, 128), (300, 100), (64, 200), (150, 149)]


def folder(root):
    """Six images of several aspect ratios, JPEG and PNG (no sidecars: the
    reference's file source ignores them)."""
    names = []
    for i, (w, h) in enumerate(SIZES):
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        (root / f"{i:02d}.{ext}").write_bytes(encode(photo(w, h, seed=i), fmt))
        names.append(f"{i:02d}.{ext}")
    return names


def config(root, **extra):
    return json.dumps({"source_type": "file",
                       "source_config": {"root_path": str(root), "random_sampling": False},
                       "image_config": IMAGE, "limit": len(SIZES), "samples_buffer_size": 8,
                       **extra})


# ---------------------------------------------------------------------------- Ctrl-C

CTRL_C = r"""
import json, os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)   # (SIG_IGN in a background job)
import datago.client
from datago import DatagoClient
datago.client.STOP_GRACE_S = 0.2           # stop() below gives up on the stuck reader sooner

class Blocked:
    # a source whose first sample never comes: the producer thread is stuck
    def set_epoch(self, epoch):
        pass
    def __iter__(self):
        threading.Event().wait(60)
        return iter(())

client = DatagoClient(json.dumps({"source_type": "file",
                                  "source_config": {"root_path": sys.argv[1]}}))
client._dataset = Blocked()
sent = []
ticks = [0]

def other():                       # runs while the main thread waits (GIL released)
    t_end = time.perf_counter() + 0.3
    while time.perf_counter() < t_end:
        ticks[0] += 1
    sent.append(time.perf_counter())
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=other, daemon=True).start()
try:
    client.get_sample()
    print(json.dumps({"error": "get_sample returned"}))
except KeyboardInterrupt:
    latency = time.perf_counter() - sent[0]
    t0 = time.perf_counter()
    client.stop()                  # the producer is stuck: stop() gives up after its grace
    print(json.dumps({"latency": latency, "ticks": ticks[0],
                      "stop_s": time.perf_counter() - t0, "after": client.get_sample()}))
"""


def test_ctrl_c_interrupts_a_waiting_get_sample(tmp_path):
    """SIGINT while get_sample() waits on a producer that never delivers:
    KeyboardInterrupt arrives at once (the poll is 50 ms; the bound here is
    generous for loaded machines), and the client still stops."""
    (tmp_path / "a.jpg").write_bytes(encode(photo(32, 32), "JPEG"))
    proc = subprocess.run([sys.executable, "-c", CTRL_C, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in out, out
    assert out["latency"] < 1.0, out
    assert out["ticks"] > 1000                      # the other thread ran while main waited
    assert out["after"] is None and out["stop_s"] < 10


def test_stop_from_another_thread_wakes_waiting_callers(tmp_path, monkeypatch):
    monkeypatch.setattr(datago.client, "STOP_GRACE_S", 0.3)
    (tmp_path / "a.jpg").write_bytes(encode(photo(32, 32), "JPEG"))
    c = DatagoClient(config(tmp_path, limit=None))
    release = threading.Event()

    class Blocked:
        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            release.wait(30)
            return iter(())

    c._dataset = Blocked()
    results = []
    threads = [threading.Thread(target=lambda: results.append(c.get_sample()))
               for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    stopper = threading.Thread(target=c.stop)
    stopper.start()
    for t in threads:
        t.join(5)
    woke = time.perf_counter() - t0
    stopper.join(5)
    assert results == [None, None, None] and woke < 5
    assert datago.live_cleanup_threads() == 1       # the stuck reader, after stop()'s grace
    release.set()
    deadline = time.monotonic() + 10
    while datago.live_cleanup_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert datago.live_cleanup_threads() == 0


# ---------------------------------------------------------------------------- compat=True

def test_compat_ids_and_attributes_are_the_references(tmp_path):
    folder(tmp_path)
    (tmp_path / "00.json").write_text(json.dumps({"caption": "cap 0", "score": 0.5}))
    c = DatagoClient(config(tmp_path), compat=True)
    s = c.get_sample()
    assert s.id == json.dumps(str(tmp_path / "00.jpg"))          # quotes included
    assert isinstance(s.attributes, str)
    assert json.loads(s.attributes) == {"caption": "cap 0", "score": 0.5}
    d = c.get_sample_auto_convert()
    assert d["id"] == json.dumps(str(tmp_path / "01.png")) and d["attributes"] == {}
    c.stop()
    c.start()
    d = c.get_sample_auto_convert()
    assert d["attributes"] == {"caption": '"cap 0"', "score": "0.5"}   # JSON-quoted values


def test_compat_ignores_unknown_keys_and_reports_bad_configs(tmp_path, caplog):
    folder(tmp_path)
    cfg = json.loads(config(tmp_path))
    cfg["typo_field"] = 1
    cfg["source_config"]["random_samplng"] = True
    cfg["image_config"] = {**IMAGE, "zzz": 3}
    cfg["prefetch_buffer_size"] = 64
    with pytest.warns(UserWarning, match="typo_field, source_config.random_samplng, "
                                         "image_config.zzz"):
        with pytest.warns(DeprecationWarning, match="prefetch_buffer_size"):
            c = DatagoClient(json.dumps(cfg), compat=True)
    assert len([s for s in c]) == len(SIZES)
    bad = {"source_type": "file", "source_config": {"root_path": str(tmp_path / "missing")}}
    with caplog.at_level(logging.ERROR, logger="datago"):
        c = DatagoClient(json.dumps(bad), compat=True)               # no exception
    assert "Failed to parse config" in caplog.text and "not an existing folder" in caplog.text
    assert c.get_sample() is None and c.get_sample_auto_convert() is None
    c.start()
    assert c.get_sample() is None
    with pytest.raises(datago.ConfigError):                           # without compat: raises
        DatagoClient(json.dumps(bad))


# ---------------------------------------------------------------------------- the reference

REF_DUMP = r"""
import json, sys
import datago
client = datago.DatagoClient(sys.argv[1])
out = []
while (s := client.get_sample()) is not None:
    p = s.image.get_payload()
    out.append({"id": s.id, "source": s.source, "attributes": s.attributes,
                "duplicate_state": s.duplicate_state, "mode": s.image.mode,
                "types": {k: type(getattr(s, k)).__name__ for k in
                          ("id", "source", "attributes", "duplicate_state", "masks",
                           "additional_images", "latents", "coca_embedding", "tags")},
                "payload": [p.width, p.height, p.original_width, p.original_height,
                            p.channels, p.bit_depth, p.is_encoded, len(p.data)]})
client.stop()
client.start()
d = client.get_sample_auto_convert()
print(json.dumps({"samples": out, "auto": {k: type(v).__name__ for k, v in d.items()}}))
"""


def _ref_python():
    venv = Path(os.environ.get("DATAGO_REF_VENV", "/tmp/datago_ref"))
    py = venv / "bin" / "python"
    if not py.exists():
        pytest.skip(f"the reference datago is not installed in {venv}")
    return py


def test_same_fields_as_the_reference_on_the_same_files(tmp_path):
    py = _ref_python()
    folder(tmp_path)
    cfg = config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(py), "-I", "-c", REF_DUMP, cfg], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"the reference failed to run: {proc.stderr[-500:]}")
    ref = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs = {r["id"]: r for r in ref["samples"]}
    c = DatagoClient(cfg, compat=True)
    ours = {}
    for s in c:
        p = s.image.get_payload()
        ours[s.id] = {"id": s.id, "source": s.source, "attributes": s.attributes,
                      "duplicate_state": s.duplicate_state, "mode": s.image.mode,
                      "types": {k: type(getattr(s, k)).__name__ for k in theirs[s.id]["types"]},
                      "payload": [p.width, p.height, p.original_width, p.original_height,
                                  p.channels, p.bit_depth, p.is_encoded, len(p.data)]}
    assert ours == theirs
    c.start()
    d = c.get_sample_auto_convert()
    assert {k: type(v).__name__ for k, v in d.items()} == ref["auto"]
    assert list(d) == list(ref["auto"])
