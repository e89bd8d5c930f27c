"""Two processes (torchrun, gloo, CPU) record the same store as one process with the same global batch.

The warmup recipe runs twice on a 42-row pool: once as 1 process × 8 rows, once as 2 processes ×
4 rows. Accelerate pads the 2-process epoch's last batch with 6 rows from its start; the record
must not contain them. Up to the padded step the two runs train on the same rows with the same
weights, so losses, sweeps and snapshots agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_datasel import RunStore

pytestmark = pytest.mark.multiprocess

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
COMMON = [
    "--tiny",
    "--pool_size", "42",
    "--max_steps", "7",  # one epoch of 6 steps (the last one padded under 2 processes), one step into the next
    "--save_strategy", "steps",
    "--save_steps", "3",
    "--sweep_steps", "3",
    "--snapshot_steps", "3",
    # Adam divides by sqrt(v) + eps: with the default 1e-8 an element whose gradient is ~0 (LoRA B is 0 at step 1)
    # takes a whole step of its rounding noise, and every later gradient through it (LoRA A's) differs by that
    # much between the two runs. With eps above such gradients the update stays linear in them, so the two runs
    # differ by float rounding only, which is what this module compares.
    "--adam_epsilon", "1e-3",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    script = str(RECIPES / "record_warmup.py")
    one = [sys.executable, script, *COMMON, "--output_dir", str(out / "one"), "--per_device_train_batch_size", "8"]
    two = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        script, *COMMON, "--output_dir", str(out / "two"), "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        for cmd in (one, two)
    ]
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
    return RunStore.for_output_dir(out / "one"), RunStore.for_output_dir(out / "two")


def test_every_row_recorded_once_per_epoch(stores):
    one, two = stores
    assert two.manifest["training"]["world_size"] == 2 and one.manifest["training"]["world_size"] == 1
    a, b = one.load_arrays("losses"), two.load_arrays("losses")
    keys_a = list(zip(a["row_id"].tolist(), a["step"].tolist(), a["epoch"].tolist()))
    keys_b = list(zip(b["row_id"].tolist(), b["step"].tolist(), b["epoch"].tolist()))
    assert keys_a == keys_b, "same rows at the same steps, in the same (step, row) order, padding dropped"
    first_epoch = a["epoch"] == 0
    assert sorted(a["row_id"][first_epoch].tolist()) == list(range(42)), "epoch 0: every row exactly once"
    assert (a["step"][~first_epoch] == 6).all() and (~first_epoch).sum() == 8
    # up to the padded step 5 both runs had the same weights (after it, 6 duplicates moved the 2-process weights)
    np.testing.assert_allclose(b["loss"][first_epoch], a["loss"][first_epoch], rtol=1e-4, atol=1e-5)
    assert two.manifest["recorded"]["loss_records"] == one.manifest["recorded"]["loss_records"] == 50


def test_rows_sweep_and_snapshots_match(stores):
    one, two = stores
    for key in ("row_id", "row_hash"):
        assert np.array_equal(one.load_arrays("rows")[key], two.load_arrays("rows")[key])
    sa, sb = one.load_arrays("sweep"), two.load_arrays("sweep")
    assert sa["steps"].tolist() == sb["steps"].tolist() == [3]
    assert sa["row_id"].tolist() == sb["row_id"].tolist() == list(range(42))
    np.testing.assert_allclose(sb["loss"], sa["loss"], rtol=1e-4, atol=1e-5)
    snap_a, snap_b = one.load_arrays("snapshots/step-000003"), two.load_arrays("snapshots/step-000003")
    assert sorted(snap_a) == sorted(snap_b) and any(k.startswith("exp_avg_sq::") for k in snap_a)
    for key in snap_a:
        a, b = snap_a[key].astype(np.float64), snap_b[key].astype(np.float64)
        # sums of per-row terms reduced in another order (two half batches, all-reduced): rounding is relative to
        # the terms, not to an element that cancels to ~0, so compare each tensor against its own norm (fp32:
        # ~1e-7 per operation, a few hundred operations deep)
        error = np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30)
        assert error <= 1e-4, (key, error)
    leftovers = [p.name for p in two.path.rglob("*.tmp")]
    assert not leftovers, f"unfinished writes: {leftovers}"


def test_sharded_featurization_matches_one_process(stores, tmp_path):
    """recipes/featurize_sharded.py: 2 processes, one shard each (5 batches: 2 + 3), merged in row order."""
    one, _ = stores
    runs = {}
    for name in ("single", "sharded"):
        shutil.copytree(one.path, tmp_path / name / "datasel")
        runs[name] = RunStore.for_output_dir(tmp_path / name)
    script = str(RECIPES / "featurize_sharded.py")
    args = ["--tiny", "--pool_size", "42", "--preconditioner", "adam", "--k", "48", "--batch_size", "9"]
    single = [sys.executable, script, *args, "--run_dir", str(tmp_path / "single")]
    sharded = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        script, *args, "--run_dir", str(tmp_path / "sharded"),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        for c in (single, sharded)
    ]
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
    folders = {name: sorted((store.path / "features").rglob("meta.json")) for name, store in runs.items()}
    assert len(folders["single"]) == len(folders["sharded"]) == 1
    a, b = folders["single"][0].parent, folders["sharded"][0].parent
    assert a.relative_to(runs["single"].path) == b.relative_to(runs["sharded"].path), "same dataset key and spec"
    assert not list(b.glob("shard-*")), "shards are merged and removed"
    assert json.loads((b / "meta.json").read_text())["plan"]["num_shards"] == 2
    np.testing.assert_array_equal(np.load(b / "norms.npy"), np.load(a / "norms.npy"))
    np.testing.assert_array_equal(np.load(b / "unit.npy"), np.load(a / "unit.npy"))
    assert np.load(a / "unit.npy").shape == (42, 48) and np.isfinite(np.load(a / "norms.npy")).all()
