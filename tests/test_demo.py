"""The demo runs end to end from the command line (small settings) and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hf_datasel.synthetic.mix import BENCH


def test_demo_cli_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "hf_datasel.cli",
        "demo",
        "--output-dir",
        str(out),
        "--pool-size",
        "160",
        "--large-steps",
        "8",
        "--budget",  # 20 % of the small test pool: 32 rows (the default, 5 %, is 100 rows of the demo's 2000)
        "0.2",
    ]
    env = {**os.environ, "HF_DATASEL_CACHE": str(tmp_path / "cache")}  # the demo's pretrained base goes here
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["less"]["rows"] == results["s2l"]["rows"] == results["random"]["rows"] == 32
    for name in ("less", "s2l", "random"):
        assert set(results[name]["eval"]["per_task_exact_match"]) == set(BENCH.mix)
        for part in ("target", "all"):
            assert 0 <= results[name]["eval"][part]["exact_match"] <= 1
        assert 0 <= results[name]["noisy_fraction"] <= 1 and 0 <= results[name]["target_fraction"] <= 1
        assert sum(results[name]["rows_per_task"].values()) == 32
    assert results["target_task"] == BENCH.target
    assert "held-out eval" in done.stdout and "LESS vs random" in done.stdout
    assert "features @ step" not in done.stderr  # the demo's sections say what happens: no progress bars
    assert "train_runtime" not in done.stdout  # nor the Trainer's log dicts
    # nor transformers' note that checkpoints saved under a second apart have unreliable mtimes
    assert "mtime" not in done.stdout + done.stderr


def test_cli_bad_input_is_one_line_not_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "hf_datasel.cli", "demo", "--budget", "3"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr and "--budget" in done.stderr
