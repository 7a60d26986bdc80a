"""Real multi-process runs: torchrun (gloo, CPU) with fork and spawn DataLoader
workers, and mp.spawn without RANK in the environment.  Every rank records
(step, bucket, ids) per batch; the test checks equal batch counts, one bucket per
step across ranks, the union of samples, and that only pad repeats repeat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from test_dataset import make_tree

_BODY = """
import json, os, sys
import torch.distributed as dist
from torch.utils.data import DataLoader

def record(root, out, context, rank_hint=None):
    from datago import DatagoDataset
    cfg = {"source_config": {"root_path": root, "random_sampling": True},
           "image_config": {"crop_and_resize": True, "default_image_size": 64,
                            "downsampling_ratio": 16},
           "batch_size": 3, "seed": 1}
    ds = DatagoDataset(cfg)
    ds.set_epoch(1)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context)
    rows = [[b["step"], list(b["bucket"]), b["id"]] for b in loader]
    rank = dist.get_rank()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rows": rows, "padded": ds.stats()["padded"],
                                      "len": len(ds)})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
"""

_TORCHRUN = _BODY + """
if __name__ == "__main__":
    root, out, context = sys.argv[1:4]
    dist.init_process_group("gloo")
    record(root, out, context)
    dist.destroy_process_group()
"""

_SPAWN = _BODY + """
import torch.multiprocessing as mp

def run(rank, root, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    record(root, out, "spawn")
    dist.destroy_process_group()

if __name__ == "__main__":
    root, init, out = sys.argv[1:4]
    mp.spawn(run, args=(root, init, out), nprocs=2, join=True)
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return root, make_tree(root, n=37)


def _env():
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def check(per_rank, ids):
    counts = {len(r["rows"]) for r in per_rank}
    assert len(counts) == 1, counts                              # equal batch counts
    assert per_rank[0]["len"] == len(per_rank[0]["rows"])        # len(ds) is exact
    for rows in zip(*(r["rows"] for r in per_rank)):
        assert len({row[0] for row in rows}) == 1                # same step ...
        assert len({tuple(row[1]) for row in rows}) == 1         # ... same bucket
    assert [row[0] for row in per_rank[0]["rows"]] == list(range(len(per_rank[0]["rows"])))
    delivered = [i for r in per_rank for row in r["rows"] for i in row[2]]
    assert set(delivered) == set(ids)                            # the union is the dataset
    repeats = sum(c - 1 for c in Counter(delivered).values())
    assert repeats == sum(r["padded"] for r in per_rank)         # only pad repeats repeat
    for r in per_rank:
        for row in r["rows"]:
            assert len(row[2]) == 3                              # full batches everywhere


@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_torchrun_two_ranks_with_workers(tree, tmp_path, context):
    root, ids = tree
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(_TORCHRUN))
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", str(script), str(root), str(out), context],
                   check=True, timeout=300, env=_env(), capture_output=True)
    check(json.loads(out.read_text()), ids)


def test_mp_spawn_without_rank_env(tree, tmp_path):
    """The issue's failure: spawned workers, no RANK env -- both ranks read everything."""
    root, ids = tree
    script = tmp_path / "spawn.py"
    script.write_text(textwrap.dedent(_SPAWN))
    out = tmp_path / "out.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    subprocess.run([sys.executable, str(script), str(root), init, str(out)], check=True,
                   timeout=300, env=_env(), capture_output=True)
    per_rank = json.loads(out.read_text())
    check(per_rank, ids)
    mine = [set(i for row in r["rows"] for i in row[2]) for r in per_rank]
    assert len(mine[0] & mine[1]) <= sum(r["padded"] for r in per_rank)   # not both everything
