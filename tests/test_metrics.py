"""The shipped `evaluate` metrics: hand-worked scores, and they load offline from the package folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from hf_datasel.metrics import EXACT_MATCH, SELECTION_STATS, load_exact_match, load_selection_stats, selection_stats
from hf_datasel.synthetic.mix import BENCH, make_family_mix


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


def test_selection_stats_by_hand():
    stats = load_selection_stats()
    # pool of 6 rows: sources a a b b b c; selected rows 0, 2, 3, 5; noisy rows 2, 4; duplicate row 5
    out = stats.compute(
        selected=[True, False, True, True, False, True],
        source=list("aabbbc"),
        target="b",
        flags={"noisy": [False, False, True, False, True, False], "duplicate": [False] * 5 + [True]},
    )
    assert out["rows"] == 4 and out["pool_rows"] == 6
    assert out["rows_by_source"] == {"a": 1, "b": 2, "c": 1}
    assert out["pool_rows_by_source"] == {"a": 2, "b": 3, "c": 1}
    assert out["share_by_source"] == {"a": 0.25, "b": 0.5, "c": 0.25}
    assert (out["target_rows"], out["target_fraction"], out["pool_target_fraction"]) == (2, 0.5, 0.5)
    assert (out["noisy_rows"], out["noisy_fraction"]) == (1, 0.25)
    assert out["pool_noisy_fraction"] == pytest.approx(2 / 6)
    assert (out["duplicate_rows"], out["duplicate_fraction"], out["pool_duplicate_fraction"]) == (1, 0.25, 1 / 6)
    empty = stats.compute(selected=[False, False], source=["a", "b"], target="a")
    assert empty["rows"] == 0 and empty["rows_by_source"] == {} and math.isnan(empty["target_fraction"])
    with pytest.raises(ValueError, match="flag 'noisy'"):
        stats.compute(selected=[True], source=["a"], flags={"noisy": [True, False]})


def test_selection_stats_on_a_pool_matches_numpy():
    pool = make_family_mix(BENCH, 300, seed=3)
    idx = np.random.default_rng(0).choice(len(pool), 45, replace=False)
    out = selection_stats(pool, idx, target=BENCH.target, flags={"noisy": "is_noisy", "duplicate": "is_duplicate"})
    noisy, dup, task = np.asarray(pool["is_noisy"]), np.asarray(pool["is_duplicate"]), np.asarray(pool["task"])
    assert out["rows"] == 45
    assert out["noisy_rows"] == int(noisy[idx].sum()) and out["noisy_fraction"] == pytest.approx(noisy[idx].mean())
    assert out["pool_noisy_fraction"] == pytest.approx(noisy.mean())
    assert out["duplicate_fraction"] == pytest.approx(dup[idx].mean())
    assert out["target_fraction"] == pytest.approx((task[idx] == BENCH.target).mean())
    names, counts = np.unique(task[idx], return_counts=True)
    assert out["rows_by_source"] == dict(zip(names.tolist(), counts.tolist()))
    with pytest.raises(ValueError, match="repeat"):
        selection_stats(pool, [1, 1])
    with pytest.raises(ValueError, match="rows of the pool"):
        selection_stats(pool, [300])


# each shipped metric, loaded by path in a fresh offline process: (folder, compute kwargs, expected subset of output)
OFFLINE = [
    (EXACT_MATCH, {"predictions": ["a", "b"], "references": ["a", "c"]}, {"exact_match": 0.5}),
    (
        SELECTION_STATS,
        {"selected": [True, False], "source": ["a", "b"], "target": "a"},
        {"rows": 1, "target_fraction": 1.0, "pool_target_fraction": 0.5},
    ),
]


@pytest.mark.parametrize(("folder", "kwargs", "expected"), OFFLINE, ids=["exact_match", "selection_stats"])
def test_metric_loads_offline_with_evaluate_load(tmp_path, folder, kwargs, expected):
    code = (
        "import evaluate, json, sys; m = evaluate.load(sys.argv[1]); "
        "print(json.dumps(m.compute(**json.loads(sys.argv[2]))))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", code, folder, json.dumps(kwargs)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: out[k] for k in expected} == expected
