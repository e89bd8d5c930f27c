"""Swift Study: RelInf values, their aggregation into in-task / cross-task scores, the report and its example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_datasel.swift import SwiftReport, aggregate_relinf, near_zero_evals, relinf


# -- aggregation on a hand-made score tensor ----------------------------------------------------
def _hand_made():
    # probes: (task, strategy); evals: tasks a, a, b; two snapshots
    probe_tasks = ["a", "b", "a", "b"]
    probe_strategies = ["direct", "direct", "cot", "cot"]
    eval_tasks = ["a", "a", "b"]
    scores = np.array(
        [
            [[1.0, 3.0, 0.5], [0.1, 0.3, 2.0], [0.4, 0.6, 0.2], [0.2, 0.4, 1.0]],
            [[2.0, 999.0, 0.0], [0.5, 999.0, 4.0], [1.0, 999.0, 0.3], [0.7, 999.0, 2.0]],
        ]
    )
    # at step 20 eval 1 is learned: norm² far below the median (1.0)
    eval_norm2 = np.array([[1.0, 2.0, 1.0], [1.0, 1e-9, 1.5]])
    return scores, eval_norm2, probe_tasks, probe_strategies, eval_tasks, [10, 20]


def test_aggregate_means_spread_counts_and_exclusions():
    scores, norm2, pt, ps, et, steps = _hand_made()
    table = aggregate_relinf(scores, norm2, pt, ps, et, steps, near_zero=1e-3)
    assert table[["step", "strategy"]].values.tolist() == [[10, "direct"], [10, "cot"], [20, "direct"], [20, "cot"]]
    row = table.iloc[0]  # step 10, direct: in-task pairs (a→e0, a→e1, b→e2), cross (a→e2, b→e0, b→e1)
    in_vals, cross_vals = np.array([1.0, 3.0, 2.0]), np.array([0.5, 0.1, 0.3])
    assert row.in_task_mean == pytest.approx(2.0)
    assert row.in_task_std == pytest.approx(in_vals.std(ddof=1))
    assert row.in_task_sem == pytest.approx(in_vals.std(ddof=1) / np.sqrt(3))
    assert row.cross_task_mean == pytest.approx(cross_vals.mean())
    assert row.cross_task_std == pytest.approx(cross_vals.std(ddof=1))
    assert (row.in_task_pairs, row.cross_task_pairs, row.excluded_evals, row.excluded_pairs) == (3, 3, 0, 0)
    row = table.iloc[3]  # step 20, cot: eval 1 left out, so in-task (1.0, 2.0), cross (0.3, 0.7)
    assert row.in_task_mean == pytest.approx(1.5) and row.in_task_pairs == 2
    assert row.cross_task_mean == pytest.approx(0.5) and row.cross_task_pairs == 2
    assert row.cross_task_sem == pytest.approx(np.std([0.3, 0.7], ddof=1) / np.sqrt(2))
    assert (row.excluded_evals, row.excluded_pairs) == (1, 2)  # the 999s never reach a mean
    assert table["in_task_mean"].max() < 10


def test_near_zero_threshold_is_relative_and_configurable():
    norm2 = np.array([[1.0, 1.0, 0.05, 0.0, np.nan]])
    assert near_zero_evals(norm2, 1e-3).tolist() == [[False, False, False, True, True]]
    assert near_zero_evals(norm2, 0.1).tolist() == [[False, False, True, True, True]]
    scores, norm2, pt, ps, et, steps = _hand_made()
    kept_all = aggregate_relinf(scores, norm2, pt, ps, et, steps, near_zero=0.0)
    assert kept_all["excluded_evals"].tolist() == [0, 0, 0, 0]  # only exact zeros go at 0
    assert kept_all["in_task_mean"].iloc[2] > 100  # ...and then the blow-up is visible
    with pytest.raises(ValueError):
        near_zero_evals(norm2, -1.0)


def test_single_task_and_nonfinite_scores():
    scores = np.array([[[1.0, np.nan]]])
    table = aggregate_relinf(scores, np.ones((1, 2)), ["a"], ["cot"], ["a", "a"], [5])
    row = table.iloc[0]
    assert (row.in_task_mean, row.in_task_pairs, row.excluded_pairs) == (1.0, 1, 1)
    assert np.isnan(row.in_task_std) and row.cross_task_pairs == 0 and np.isnan(row.cross_task_mean)


def test_relinf_formula():
    g = torch.Generator().manual_seed(0)
    probes = torch.randn(3, 7, generator=g, dtype=torch.float64)
    evals = torch.randn(4, 7, generator=g, dtype=torch.float64)
    scores, norm2 = relinf(probes, evals)
    for i in range(3):
        for j in range(4):
            assert scores[i, j].item() == pytest.approx((probes[i] @ evals[j] / (evals[j] @ evals[j])).item())
    assert torch.allclose(norm2, (evals.double() ** 2).sum(1))
    assert torch.allclose(relinf(evals, evals)[0].diagonal(), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        relinf(probes, torch.randn(4, 6, dtype=torch.float64))


def test_report_save_load_plot(tmp_path):
    scores, norm2, pt, ps, et, steps = _hand_made()
    report = SwiftReport(steps, scores, norm2, pt, ps, et, info={"run": "x"})
    assert report.strategies == ["direct", "cot"] and report.excluded.sum() == 1
    paths = report.save(tmp_path)
    again = SwiftReport.load(tmp_path)
    assert again.table.equals(report.table) and again.info == {"run": "x"}
    assert SwiftReport.load(tmp_path, near_zero=0.0).excluded.sum() == 0
    assert report.with_near_zero(0.0).table["excluded_evals"].sum() == 0
    assert paths["csv"].read_text().splitlines()[0].startswith("step,strategy,in_task_mean")
    png = tmp_path / "swift.png"
    report.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Left out as already learned" in report.summary()
