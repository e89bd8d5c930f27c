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


def test_spread_over_probes():
    scores, norm2, pt, ps, et, steps = _hand_made()
    table = aggregate_relinf(scores, norm2, pt, ps, et, steps, spread="probes")
    row = table.iloc[0]  # step 10, direct: per-probe in-task means (2.0, 2.0), cross-task means (0.5, 0.2)
    assert row.in_task_mean == pytest.approx(2.0) and row.in_task_std == pytest.approx(0.0)
    assert row.cross_task_mean == pytest.approx(0.3)  # the mean stays the mean over pairs
    assert row.cross_task_std == pytest.approx(np.std([0.5, 0.2], ddof=1))
    assert row.cross_task_sem == pytest.approx(np.std([0.5, 0.2], ddof=1) / np.sqrt(2))
    assert (row.in_task_pairs, row.cross_task_pairs) == (3, 3)
    report = SwiftReport(steps, scores, norm2, pt, ps, et).with_settings(spread="probes")
    assert report.table.equals(table) and "over probes" in report.summary()
    with pytest.raises(ValueError):
        aggregate_relinf(scores, norm2, pt, ps, et, steps, spread="evals")


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


def test_compare_and_by_task():
    scores, norm2, pt, ps, et, steps = _hand_made()
    report = SwiftReport(steps, scores, norm2, pt, ps, et)
    diff = report.compare("direct")
    assert diff[["step", "strategy", "baseline"]].values.tolist() == [[10, "cot", "direct"], [20, "cot", "direct"]]
    t = report.table.set_index(["step", "strategy"])
    assert diff.cross_task_diff.iloc[1] == pytest.approx(0.5 - t.at[(20, "direct"), "cross_task_mean"])
    sems = t.at[(10, "cot"), "in_task_sem"], t.at[(10, "direct"), "in_task_sem"]
    assert diff.in_task_diff_sem.iloc[0] == pytest.approx(np.hypot(*sems))
    with pytest.raises(ValueError):
        report.compare("clarify")
    cells = report.by_task().set_index(["step", "strategy", "probe_task", "eval_task"])
    assert cells.at[(10, "direct", "a", "a"), "mean"] == pytest.approx(2.0)  # probe 0 vs evals 0, 1
    assert cells.at[(20, "direct", "a", "a"), "pairs"] == 1  # eval 1 left out at step 20
    assert cells.at[(20, "cot", "b", "b"), "mean"] == pytest.approx(2.0)


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
    paths = report.with_settings(spread="probes").save(tmp_path)
    assert SwiftReport.load(tmp_path).spread == "probes"
    paths = report.save(tmp_path)
    again = SwiftReport.load(tmp_path)
    assert again.table.equals(report.table) and again.info == {"run": "x"}
    assert SwiftReport.load(tmp_path, near_zero=0.0).excluded.sum() == 0
    assert report.with_settings(near_zero=0.0).table["excluded_evals"].sum() == 0
    assert paths["csv"].read_text().splitlines()[0].startswith("step,strategy,in_task_mean")
    png = tmp_path / "swift.png"
    report.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Left out (eval already learned" in report.summary()


# -- RelInf against an independent autograd loop, at real snapshot weights ------------------------
def _probes_and_evals():
    from datasets import Dataset

    probes = Dataset.from_dict(
        {
            "prompt": ["add 3+4=", "add 3+4=", "rev abc=", "rev abc=", "copy dab="],
            "completion": ["7", "3+4=7 so 7", "cba", "c b a so cba", "dab"],
            "task": ["add", "add", "reverse", "reverse", "copy"],
            "strategy": ["direct", "cot", "direct", "cot", "direct"],
        }
    )
    evals = Dataset.from_dict(
        {
            "prompt": ["add 12+5=", "rev hgfe=", "copy kjl=", "add 1+1="],
            "completion": ["17", "efgh", "kjl", "2"],
            "task": ["add", "reverse", "copy", "add"],
        }
    )
    return probes, evals


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory, tokenizer, pool):
    from trl import SFTTrainer

    from hf_datasel import SnapshotCallback
    from hf_datasel.synthetic import build_model
    from tests.conftest import sft_config

    out = tmp_path_factory.mktemp("swift_run")
    trainer = SFTTrainer(
        model=build_model(tokenizer, seed=0),
        args=sft_config(out, max_steps=4, learning_rate=3e-3),
        train_dataset=pool,
        processing_class=tokenizer,
        callbacks=[SnapshotCallback(steps=[1, 4])],
    )
    trainer.train()
    return out


def _loop_gradients(model, tokenizer, dataset) -> torch.Tensor:
    """One row at a time: loss.backward() of the model's own loss, flattened over trainable parameters."""
    from hf_datasel.data import pad_batch, tokenize_rows

    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for row in tokenize_rows(dataset, tokenizer, max_length=1024):
        model.zero_grad()
        model(**pad_batch([row], tokenizer.pad_token_id)).loss.backward()
        out.append(torch.cat([p.grad.detach().flatten().double() for p in params]))
    return torch.stack(out)


def test_relinf_equals_one_at_a_time_autograd(snapshot_run, tokenizer):
    from safetensors.torch import load_file

    from hf_datasel import swift_study
    from hf_datasel.synthetic import build_model

    probes, evals = _probes_and_evals()
    report = swift_study(snapshot_run, probes=probes, evals=evals, batch_size=3)
    assert report.steps.tolist() == [1, 4] and report.info["gradients"] == "exact"
    files = sorted((snapshot_run / "datasel" / "snapshots").glob("step-*.safetensors"))
    assert len(files) == 2
    for t, path in enumerate(files):
        model = build_model(tokenizer, seed=123)  # other initial weights: everything comes from the snapshot
        weights = {k.removeprefix("param::"): v for k, v in load_file(str(path)).items() if k.startswith("param::")}
        missing = set(dict(model.named_parameters())) - set(weights)
        assert not missing
        model.load_state_dict(weights, strict=False)
        model.eval()
        gp, ge = _loop_gradients(model, tokenizer, probes), _loop_gradients(model, tokenizer, evals)
        expected = (gp @ ge.T) / (ge * ge).sum(1)
        np.testing.assert_allclose(report.scores[t], expected.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(report.eval_norm2[t], (ge * ge).sum(1).numpy(), rtol=1e-4)
    assert report.scores[1].std() > 0 and not np.allclose(report.scores[0], report.scores[1])
    table = report.table
    assert len(table) == 4 and set(table["strategy"]) == {"direct", "cot"}
    cot = table[(table.step == 4) & (table.strategy == "cot")].iloc[0]
    assert (cot.in_task_pairs, cot.cross_task_pairs) == (3, 5)  # add→2 add evals, rev→1 rev eval; 8 pairs in all


def test_relinf_on_lora_weights_equals_autograd(tmp_path, tokenizer, pool):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from trl import SFTTrainer

    from hf_datasel import SnapshotCallback, swift_study
    from hf_datasel.synthetic import build_model
    from tests.conftest import sft_config

    def lora_model():
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
        return get_peft_model(build_model(tokenizer, seed=0), config)

    trainer = SFTTrainer(
        model=lora_model(),
        args=sft_config(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=pool,
        processing_class=tokenizer,
        callbacks=[SnapshotCallback(steps=[2])],
    )
    trainer.train()
    probes, evals = _probes_and_evals()
    report = swift_study(tmp_path, probes=probes, evals=evals, model=lora_model())
    assert report.info["trainable_parameters"] == 2 * 2 * 4 * (64 + 64)  # 2 layers x (q, v) x r x (in + out)
    model = lora_model()  # base weights never trained, so equal to the run's; adapters from the snapshot
    path = tmp_path / "datasel" / "snapshots" / "step-000002.safetensors"
    weights = {k.removeprefix("param::"): v for k, v in load_file(str(path)).items() if k.startswith("param::")}
    assert all("lora_" in name for name in weights)
    model.load_state_dict(weights, strict=False)
    model.eval()
    gp, ge = _loop_gradients(model, tokenizer, probes), _loop_gradients(model, tokenizer, evals)
    np.testing.assert_allclose(report.scores[0], ((gp @ ge.T) / (ge * ge).sum(1)).numpy(), rtol=1e-4, atol=1e-6)


def test_projected_relinf_tracks_exact(snapshot_run):
    from hf_datasel import swift_study

    probes, evals = _probes_and_evals()
    exact = swift_study(snapshot_run, probes=probes, evals=evals, steps=[4])
    projected = swift_study(snapshot_run, probes=probes, evals=evals, steps=[4], projection_dim=4096)
    assert projected.info["gradients"].startswith("projected") and "k=4096" in projected.info["gradients"]
    assert np.corrcoef(exact.scores.ravel(), projected.scores.ravel())[0, 1] > 0.95


def test_study_column_errors(snapshot_run):
    from hf_datasel import swift_study

    probes, evals = _probes_and_evals()
    with pytest.raises(ValueError, match="strategy"):
        swift_study(snapshot_run, probes=probes.remove_columns("strategy"), evals=evals)
    with pytest.raises(ValueError, match="task"):
        swift_study(snapshot_run, probes=probes, evals=evals.remove_columns("task"))
    with pytest.raises(ValueError, match="'messages', or 'text'"):
        swift_study(snapshot_run, probes=probes.remove_columns(["prompt", "completion"]), evals=evals)


# -- the example and the command-line function ------------------------------------------------------
def _load_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "swift_study.py"
    spec = importlib.util.spec_from_file_location("swift_study_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_chain_of_thought_probes():
    example = _load_example()
    assert example.chain_of_thought("add", "add 27+15=", "42") == "7+5=12 20+10=30 30+12=42 so 42"
    assert example.chain_of_thought("reverse", "rev abcd=", "dcba") == "d c b a so dcba"
    probes = example.make_probes(per_task=2)
    assert len(probes) == 16 and probes["strategy"].count("cot") == 8
    assert (
        probes.filter(lambda r: r["strategy"] == "cot")["prompt"]
        == probes.filter(lambda r: r["strategy"] == "direct")["prompt"]
    )  # the same questions, answered two ways
    direct = probes.filter(lambda r: r["strategy"] == "direct")["completion"]
    assert [c.split(" so ")[-1] for c in probes.filter(lambda r: r["strategy"] == "cot")["completion"]] == direct
    wrong = example.make_probes(per_task=2, strategies=("direct", "wrong"))
    assert all(w != d for w, d in zip(wrong["completion"][8:], wrong["completion"][:8]))
    with pytest.raises(ValueError):
        example.make_probes(strategies=("clarify",))


def test_example_runs_and_cli_writes_table_and_plot(tmp_path):
    import json

    import pandas as pd

    from hf_datasel.swift import run_swift_cli

    example = _load_example()
    plot = tmp_path / "swift.png"
    report = example.main(
        tmp_path / "run", plot, max_steps=4, snapshots=2, train_rows=64, probes_per_task=1, evals_per_task=2
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.table[["step", "strategy"]].values.tolist() == [[2, "direct"], [2, "cot"], [4, "direct"], [4, "cot"]]
    counts = report.table[["in_task_pairs", "cross_task_pairs", "excluded_pairs"]].sum(axis=1)
    assert (counts == 4 * 8).all()  # per strategy: 4 probes (one per task) x 8 evals
    assert (tmp_path / "run" / "swift" / "swift_table.csv").exists()

    run = tmp_path / "run"
    paths = run_swift_cli(run, run / "probes.jsonl", run / "evals.jsonl", tmp_path / "cli", near_zero=0.01, band="std")
    table = pd.read_csv(paths["csv"])
    assert table.shape[0] == 4 and list(table.columns[:3]) == ["step", "strategy", "in_task_mean"]
    np.testing.assert_allclose(
        table["in_task_mean"], report.with_settings(near_zero=0.01).table["in_task_mean"], rtol=1e-6
    )
    assert json.loads(paths["json"].read_text())["near_zero"] == 0.01
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
