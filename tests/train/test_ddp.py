"""DistributedDataParallel: 2 CPU processes (gloo) under torchrun train a distilled student for a
few steps. Without gradient synchronisation the two ranks, which see different slices, would
end with different parameters; with it they end identical, and equal to what rank 0 saved
(BatchNorm running statistics stay per process, as DDP keeps them)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.training_data import write_phantom_lits
from regionkd.train.checkpoint import load_model, log_path_for, params_sha256
from regionkd.train.config import make_config
from regionkd.train.sampling import epoch_batches
from regionkd.train.trainer import train

TINY = dict(preset="demo", input_size=64, batch_size=2, log_every=1, quiet=True)

ENTRY = textwrap.dedent("""
    import json, os, sys
    from regionkd.train.config import make_config
    from regionkd.train.trainer import train
    data, out, teacher, cache = sys.argv[1:5]
    s = train(make_config("distill", "tinynet", data, out, teacher=teacher, cache_dir=cache, preset="demo", kd="pmd,imd,rad",
                          input_size=64, batch_size=2, epochs=1, samples_per_epoch=12, log_every=1, quiet=True))
    # one file per rank: lines the two ranks print at once can interleave on the shared stdout
    with open(out + ".summary-" + os.environ["RANK"] + ".json", "w") as f:
        json.dump(s, f)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_phantom_lits(tmp_path_factory.mktemp("phantoms"), n=4, shape=(64, 64, 12))


def test_two_gloo_processes_stay_in_sync(data, tmp_path):
    cache = str(tmp_path / "cache")
    teacher = tmp_path / "teacher.pt"
    train(make_config("teacher", "tinynet", data, teacher, cache_dir=cache, max_steps=1, epochs=1,
                      samples_per_epoch=4, **TINY))
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(entry), str(data), str(out), str(teacher), cache],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads((tmp_path / f"ddp.pt.summary-{r}.json").read_text()) for r in (0, 1)]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert all(s["world_size"] == 2 and s["steps"] == 3 for s in summaries)   # 12 slices / (2 x 2) per step
    assert summaries[0]["params_sha256"] == summaries[1]["params_sha256"]
    model, ckpt = load_model(out)
    assert params_sha256(model) == summaries[0]["params_sha256"]
    assert ckpt["train_state"]["world_size"] == 2
    log = [json.loads(line) for line in log_path_for(out).read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["world_size"] == 2
    assert sum(r["event"] == "step" for r in log) == 3     # only rank 0 writes
    assert all(r["loss"]["rad"] is not None for r in log if r["event"] == "step")


class FakeCfg:
    seed, lesion_fraction, batch_size, unlabelled_batch = 5, 0.5, 3, None


def test_ranks_split_one_epoch_order_between_them(data, tmp_path):
    """Every rank draws the same order and keeps every world-th slice: the two shards are
    disjoint and interleave back into rank-independent positions."""
    from regionkd.train.data.slices import SliceCache, SliceDataset, split_cases
    from regionkd.train.data import open_dataset

    ds = open_dataset(data)
    cache = SliceCache.build(data, tmp_path / "c", window=None, input_size=(64, 64))
    train_ids, _ = split_cases(list(ds.case_ids), val_fraction=0.2, seed=0)
    sds = SliceDataset(cache, train_ids, augment=True)
    r0 = epoch_batches(sds, 0, FakeCfg, 4, rank=0, world=2)
    r1 = epoch_batches(sds, 0, FakeCfg, 4, rank=1, world=2)
    assert len(r0) == len(r1) == 4 and all(len(b) == 3 for b in r0 + r1)
    flat0 = [item for b in r0 for item in b]
    flat1 = [item for b in r1 for item in b]
    seeds0, seeds1 = {s for _, _, s in flat0}, {s for _, _, s in flat1}
    assert not seeds0 & seeds1                        # different slices/augmentations per rank
    assert epoch_batches(sds, 0, FakeCfg, 4, rank=0, world=2) == r0        # same order on every call
    assert epoch_batches(sds, 1, FakeCfg, 4, rank=0, world=2) != r0        # a new order per epoch
    assert all(src == 0 and 0 <= i < len(sds) for src, i, _ in flat0 + flat1)
    assert np.unique([s for _, _, s in flat0 + flat1]).size == 24
