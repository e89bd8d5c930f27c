"""The shipped `evaluate` metric: hand-worked scores, and it loads offline from the package folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_datasel.metrics import EXACT_MATCH, load_exact_match


def test_exact_match_overall_and_per_group_by_hand():
    em = load_exact_match()
    scores = em.compute(
        predictions=["12", "ab", "ba", "x", " c"], references=["12", "ab", "ab", "y", "c"], groups=list("aabbb")
    )
    assert scores["exact_match"] == pytest.approx(2 / 5)  # " c" != "c" unless strip=True
    assert scores["exact_match_by_group"] == {"a": 1.0, "b": 0.0}
    assert scores["count_by_group"] == {"a": 2, "b": 3}
    assert em.compute(predictions=[" c"], references=["c"], strip=True)["exact_match"] == 1.0
    with pytest.raises(ValueError, match="groups"):
        em.compute(predictions=["a"], references=["a"], groups=["g", "h"])


def test_exact_match_loads_offline_with_evaluate_load(tmp_path):
    code = (
        "import evaluate, json, sys; m = evaluate.load(sys.argv[1]); "
        "print(json.dumps(m.compute(predictions=['a', 'b'], references=['a', 'c'])))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code, EXACT_MATCH], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"exact_match": 0.5}
