"""Killed with `kill -9` at each phase, the same command run again leaves the files of an uninterrupted run.

Each test runs the command once without a fault (the reference), once in a subprocess that is
killed at a fault point (`tests/fault_driver.py`), then the same command again, and compares the
files bitwise. Runs are single-threaded, so floating-point sums come out the same in every process.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_datasel.locks import LockOwner
from hf_datasel.store import RunStore
from tests.test_cli import assert_user_error, invoke
from tests.test_locks import dead_pid

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
DRIVER = ROOT / "tests" / "fault_driver.py"
RECORD_ARGS = [
    "--tiny", "--pool_size", "24", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
    "--sweep_steps", "saves", "--snapshot_steps", "saves", "--lora_target_modules", "q_proj,v_proj",
]  # fmt: skip


@contextlib.contextmanager
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kill_at(fault: str, workdir: Path, *command: str, timeout: float = 300) -> None:
    """Run `fault_driver.py <command>` until it reaches `fault`, then SIGKILL it."""
    marker, log = workdir / "fault-reached", workdir / "fault.log"
    marker.unlink(missing_ok=True)
    env = {
        **os.environ,
        "FAULT": fault,
        "FAULT_MARKER": str(marker),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(DRIVER), *command], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{fault} was never reached:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_files(expected: dict[str, bytes], got: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if got[name] != expected[name]]
    assert not different, f"files differ: {different}"


def run_recipe(name: str, argv: list[str]) -> None:
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    with one_thread():
        importlib.import_module(name).main(argv)


# -- recording --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """The uninterrupted recording, moved to `reference/` (it was made in `run/`, as the faulty runs are)."""
    out = tmp_path_factory.mktemp("record")
    run_recipe("record_warmup", [*RECORD_ARGS, "--output_dir", str(out / "run")])
    (out / "run").rename(out / "reference")
    return out


def comparable_store(folder: Path) -> dict[str, bytes]:
    """The store's files; the manifest without what says when and from where the run started."""
    found = files(folder)
    manifest = json.loads(found.pop("manifest.json"))
    del manifest["created"], manifest["training"]["resumed_from_step"]
    found["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return found


@pytest.mark.parametrize(
    "fault, flushed",
    [("step:5", 4), ("sweep:4", 2)],  # between the flushes at steps 4 and 6; in the sweep at step 4, before its flush
)
def test_recording_killed_then_run_again_equals_an_uninterrupted_run(recording, fault, flushed):
    run = recording / "run"
    shutil.rmtree(run, ignore_errors=True)
    argv = [*RECORD_ARGS, "--output_dir", str(run)]
    kill_at(fault, recording, str(RECIPES / "record_warmup.py"), *argv)
    assert RunStore(run / "datasel").manifest["recorded"]["last_step"] == flushed  # records after it were lost
    run_recipe("record_warmup", argv)
    assert_same_files(comparable_store(recording / "reference" / "datasel"), comparable_store(run / "datasel"))


# -- featurize, export ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, tokenizer, pool):
    """A run with LoRA snapshots at steps 2 and 4, and its rows as jsonl."""
    from tests.gradient_store import make_snapshot_store

    out = tmp_path_factory.mktemp("snapshots")
    rows = pool.select(range(24))
    make_snapshot_store(out, tokenizer, rows, steps=(2, 4))
    rows.to_json(out / "rows.jsonl")
    return out


def test_featurize_killed_mid_snapshot_then_run_again(snapshots, tmp_path):
    for name in ("reference", "faulty"):
        shutil.copytree(snapshots / "run", tmp_path / name)
    argv = [str(snapshots / "rows.jsonl"), "--k", "16", "--batch-size", "4", "--preconditioner", "adam"]
    with one_thread():
        assert invoke("featurize", tmp_path / "reference", *argv).exit_code == 0
    kill_at("batch:8", tmp_path, "cli", "featurize", str(tmp_path / "faulty"), *argv)  # 2nd snapshot, 2nd batch
    (partial,) = (tmp_path / "faulty").rglob("done.log")  # only the 2nd snapshot is unfinished
    assert len(partial.read_text().split()) < 2  # its last batch was written, not logged: it is computed again
    with one_thread():
        again = invoke("featurize", tmp_path / "faulty", *argv)
    assert again.exit_code == 0, again.output
    expected = files(tmp_path / "reference" / "datasel" / "features")
    assert_same_files(expected, files(tmp_path / "faulty" / "datasel" / "features"))


def test_an_export_killed_half_way_then_run_again(tmp_path, pool):
    from tests.test_hub import write_fake_store

    write_fake_store(tmp_path / "run", pool)
    pool.to_json(tmp_path / "pool.jsonl")
    argv = [str(tmp_path / "run"), str(tmp_path / "pool.jsonl"), "-m", "loss", "-b", "0.25", "--with-scores"]
    assert invoke("select", *argv, "-o", tmp_path / "reference").exit_code == 0
    kill_at("card", tmp_path, "cli", "select", *argv, "-o", str(tmp_path / "subset"))
    assert not (tmp_path / "subset").exists()  # the half-written export is hidden, not in the way
    again = invoke("select", *argv, "-o", tmp_path / "subset")
    assert again.exit_code == 0, again.output
    assert_same_files(files(tmp_path / "reference"), files(tmp_path / "subset"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".subset.partial-")]  # the leftover is gone


def test_a_shard_merge_killed_half_way_is_taken_over_by_the_next_run(snapshots, tmp_path):
    for name in ("reference", "faulty"):
        shutil.copytree(snapshots / "run", tmp_path / name)
    argv = [str(snapshots / "rows.jsonl"), "--k", "16", "--batch-size", "4"]
    with one_thread():  # the reference: both shards, the second merging, no fault
        assert invoke("featurize", tmp_path / "reference", *argv, "--shard", "1/2").exit_code == 0
        assert invoke("featurize", tmp_path / "reference", *argv, "--shard", "0/2").exit_code == 0
        first = invoke("featurize", tmp_path / "faulty", *argv, "--shard", "1/2")
    assert "shard 1/2 done" in first.stdout, first.output
    kill_at("merge", tmp_path, "cli", "featurize", str(tmp_path / "faulty"), *argv, "--shard", "0/2")
    (lock,) = (tmp_path / "faulty").rglob("merge.lock")  # left behind by the killed merger
    with one_thread():
        again = invoke("featurize", tmp_path / "faulty", *argv, "--shard", "0/2")
    assert again.exit_code == 0 and "step 4:" in again.stdout, again.output
    assert "warning: took over" in again.stderr and "that process is gone" in again.stderr
    expected = files(tmp_path / "reference" / "datasel" / "features")
    assert_same_files(expected, files(tmp_path / "faulty" / "datasel" / "features"))


def test_a_stale_merge_lock_never_wedges_an_unsharded_featurize(snapshots, tmp_path):
    shutil.copytree(snapshots / "run", tmp_path / "run")
    argv = [str(snapshots / "rows.jsonl"), "--k", "16", "--batch-size", "8", "--steps", "2"]
    with one_thread():
        assert invoke("featurize", tmp_path / "run", *argv).exit_code == 0
    (meta,) = (tmp_path / "run").rglob("meta.json")
    folder = meta.parent
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    dead = LockOwner.current().__class__(**{**LockOwner.current().__dict__, "pid": dead_pid(), "started": None})
    (folder / "merge.lock").write_bytes(dead.to_bytes())  # what a merger killed long ago left
    with one_thread():
        result = invoke("featurize", tmp_path / "run", *argv)
    assert result.exit_code == 0 and "step 2:" in result.stdout and "shard None" not in result.output, result.output
    assert "warning: took over" in result.stderr and not (folder / "merge.lock").exists()


def test_broken_feature_files_are_one_line_naming_them(snapshots, tmp_path):
    shutil.copytree(snapshots / "run", tmp_path / "run")
    argv = [str(snapshots / "rows.jsonl"), "--k", "16", "--batch-size", "8", "--steps", "2"]
    with one_thread():
        assert invoke("featurize", tmp_path / "run", *argv).exit_code == 0
    (meta,) = (tmp_path / "run").rglob("meta.json")
    for name in ("unit.npy", "norms.npy", "meta.json"):
        path = meta.parent / name
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])
        result = invoke("featurize", tmp_path / "run", *argv)
        assert_user_error(result, str(path), "unreadable", f"delete {meta.parent}")
        path.write_bytes(good)
