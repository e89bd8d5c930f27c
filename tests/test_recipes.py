"""The S2L and LESS recipes run end to end in their --tiny CPU mode and write what a selector would choose.

(The warmup recording and sharded featurization recipes run in tests/test_multiprocess.py,
under 1 and 2 processes.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset
from huggingface_hub import DatasetCard

from hf_datasel import DataSelector
from hf_datasel.synthetic import make_pool

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    commands = {
        "s2l": [
            sys.executable, str(RECIPES / "s2l_small_to_large.py"), "--tiny", "--output_dir", str(out / "s2l"),
            "--pool_size", "64", "--num_clusters", "6", "--sweeps", "3", "--large_max_steps", "2", "--budget", "0.25",
        ],
        "less": [
            sys.executable, str(RECIPES / "less_end_to_end.py"), "--tiny", "--output_dir", str(out / "less"),
            "--pool_size", "48", "--projection_dim", "32", "--budget", "12", "--lora_target_modules", "q_proj,v_proj",
        ],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for name, cmd in commands.items()
    }
    for proc in procs.values():
        log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, log[-3000:]
    return out


def test_s2l_recipe(outputs):
    pool = make_pool(64, noise=0.2, seed=0)
    subset = load_dataset(str(outputs / "s2l" / "subset"), split="train")
    expected = DataSelector.from_run(outputs / "s2l" / "proxy", pool).select("s2l", budget=0.25, num_clusters=6)
    assert subset.to_list() == expected.to_list() and len(subset) == 16
    card = DatasetCard.load(outputs / "s2l" / "subset" / "README.md").data.to_dict()["datasel"]
    assert card["method"] == "s2l" and card["parameters"]["num_clusters"] == 6
    large = json.loads((outputs / "s2l" / "large" / "config.json").read_text())
    assert large["hidden_size"] == 128 and (outputs / "s2l" / "large" / "model.safetensors").exists()


def test_less_recipe(outputs):
    pool = make_pool(48, noise=0.2, seed=0)
    targets = make_pool(16, tasks=("add",), noise=0.0, seed=1)
    subset = load_dataset(str(outputs / "less" / "subset"), split="train")
    selector = DataSelector.from_run(outputs / "less", pool)
    expected = selector.select(
        "less", budget=12, targets=targets, k=32, max_length=32, batch_size=16
    )  # features cached by the recipe: nothing recomputed
    assert subset.to_list() == expected.to_list() and len(subset) == 12
    card = DatasetCard.load(outputs / "less" / "subset" / "README.md").data.to_dict()["datasel"]
    assert card["method"] == "less" and card["scores"]["count"] == 12
    assert sorted(selector.store.manifest["snapshots"][i]["step"] for i in range(2)) == [4, 8]


def test_cli_selects_less_from_the_recipe_run(outputs, tmp_path):
    """`hf-datasel select -m less --targets ...` on the recipe's store gives the recipe's subset (cached features)."""
    from typer.testing import CliRunner

    from hf_datasel.cli import app

    make_pool(48, noise=0.2, seed=0).to_json(tmp_path / "pool.jsonl")
    make_pool(16, tasks=("add",), noise=0.0, seed=1).to_json(tmp_path / "targets.jsonl")
    args = ["select", outputs / "less", tmp_path / "pool.jsonl", "-m", "less", "-b", "12", "-o", tmp_path / "sel"]
    args += ["--targets", tmp_path / "targets.jsonl", "-p", "k=32", "-p", "max_length=32", "--with-scores"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    chosen = load_dataset(str(tmp_path / "sel"), split="train")
    recipe = load_dataset(str(outputs / "less" / "subset"), split="train")
    assert chosen.remove_columns("datasel_score").to_list() == recipe.to_list()
    assert len(chosen) == 12 and all(s == s for s in chosen["datasel_score"])


def test_cli_selects_g2is_from_the_recipe_run(outputs, tmp_path):
    from typer.testing import CliRunner

    from hf_datasel.cli import app

    pool = make_pool(48, noise=0.2, seed=0)
    targets = make_pool(16, tasks=("add",), noise=0.0, seed=1)
    pool.to_json(tmp_path / "pool.jsonl")
    targets.to_json(tmp_path / "targets.jsonl")
    args = ["select", outputs / "less", tmp_path / "pool.jsonl", "-m", "g2is", "-b", "10", "-o", tmp_path / "sel"]
    args += ["--targets", tmp_path / "targets.jsonl", "-p", "k=32", "-p", "max_length=32", "-p", "num_neighbors=8"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    selector = DataSelector.from_run(outputs / "less", pool)
    expected = selector.select("g2is", budget=10, targets=targets, k=32, max_length=32, num_neighbors=8)
    assert load_dataset(str(tmp_path / "sel"), split="train").to_list() == expected.to_list()
