"""The benchmark harnesses at tiny settings: JSON structure, and numbers that come from the runs (no timings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hf_datasel.bench import quality as quality_module
from hf_datasel.bench.perf import PerfConfig, run_part, run_perf
from hf_datasel.bench.quality import (
    FULL,
    ORACLE,
    QualityConfig,
    budget_table,
    less_separation,
    markdown_table,
    proxy_learning,
    proxy_learning_table,
    run_quality,
    seed_data,
    separation_table,
    unseen_config,
    write_reports,
)
from hf_datasel.bench.recorder import run_recorder_bench
from hf_datasel.featurize import gradient_features
from hf_datasel.methods import SelectionContext
from hf_datasel.methods.less import less_scores, select_less
from hf_datasel.selector import resolve_budget
from hf_datasel.store import library_versions
from hf_datasel.synthetic import make_pool
from tests.gradient_store import make_snapshot_store


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    config = QualityConfig(
        pool_size=48,
        budgets=(0.5,),
        seeds=(0, 1),
        variants=("random", "s2l"),
        proxy_epochs=1,
        large_steps=2,
        epochs=1,
        pretrain_steps=2,
        pretrain_rows=32,
        eval_rows=6,
        eval_rows_per_task=1,
        target_examples=4,
        workers=1,
        output_dir=str(root / "runs"),
        results_dir=str(root / "docs"),
        base_cache=str(root / "cache"),
    )
    result = run_quality(config, log=lambda *a: None)
    return config, result, root


def test_quality_writes_json_plot_and_table(quality):
    config, result, root = quality
    on_disk = json.loads((root / "docs" / "quality.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(result["summary"]))
    assert (root / "docs" / "quality.png").stat().st_size > 0
    report = (root / "docs" / "quality.md").read_text()
    assert "| s2l |" in report and "# unseen pools (family 'unseen'" in report
    assert "| less_5pct_target_em_vs_full |" not in report  # no LESS run here: no LESS goal row
    assert set(on_disk) >= {"settings", "machine", "pool", "runs", "summary", "summary_by_protocol", "goals"}
    assert on_disk["versions"] == library_versions() and len(on_disk["code"]["commit"] or "") in (0, 40)
    for model in ("large", "proxy"):  # the bases it fine-tuned and recorded from, as cached
        assert (Path(on_disk["bases"][model]) / "config.json").exists()
    methods = {r["method"] for r in result["runs"]}
    assert methods == {"random", "s2l", ORACLE, FULL}
    # per seed and protocol: 2 methods and the oracle at every budget, and the full pool
    assert len(result["runs"]) == len(config.seeds) * 2 * (3 * len(config.budgets) + 1)
    for run in result["runs"]:
        for part in ("target", "all"):
            assert set(run["eval"][part]) == {"loss", "exact_match"}
            assert 0.0 <= run["eval"][part]["exact_match"] <= 1.0
            assert np.isfinite(run["eval"][part]["loss"])
        assert set(run["eval"]["per_task_exact_match"]) == set(config.task_mix())
        all_em = np.mean(list(run["eval"]["per_task_exact_match"].values()))
        assert run["eval"]["all"]["exact_match"] == pytest.approx(all_em)  # every task counts equally
        assert run["steps"] == (config.large_steps if run["protocol"] == "steps" else -(-run["rows"] // 16))
    assert set(result["goals"]) == {"pool_noisy_fraction", "steps", "epochs"}
    unseen = result["unseen"]  # the same benchmark on the unseen family, on other seeds
    assert unseen["settings"]["family"] == "unseen" and unseen["settings"]["target_task"] == "vf"
    assert unseen["settings"]["seeds"] == [s + config.unseen_seed_offset for s in config.seeds]
    assert len(unseen["runs"]) == len(result["runs"]) and set(unseen["goals"]) == set(result["goals"])
    assert {r["seed"] for r in unseen["runs"]} == set(unseen["settings"]["seeds"])
    assert set(unseen["runs"][0]["eval"]["per_task_exact_match"]) == set(unseen_config(config).task_mix())
    assert on_disk["unseen"]["summary"] == json.loads(json.dumps(unseen["summary"]))
    table = markdown_table(result, 0.5, "epochs")
    assert "| full pool (100 %) |" in table and "| oracle (clean target rows) |" in table
    assert "| random |" in budget_table(result)
    write_reports(on_disk, root / "again" / "quality")  # --replot: the same reports from the JSON alone
    assert (root / "again" / "quality.png").exists()
    assert (root / "again" / "quality.md").read_text() == (root / "docs" / "quality.md").read_text()


@pytest.mark.parametrize("family", ["own", "unseen"])
def test_quality_counts_come_from_the_selections(quality, family):
    config, result, root = quality
    if family == "unseen":
        config, result = unseen_config(config), result["unseen"]
    for seed in config.seeds:
        pool = seed_data(config, seed)["pool"]
        noisy = np.asarray(pool["is_noisy"])
        is_target = np.asarray(pool["task"]) == config.target_task
        selections = json.loads((Path(config.output_dir) / f"seed-{seed}" / "selections.json").read_text())
        runs = [r for r in result["runs"] if r["seed"] == seed]
        full = [r for r in runs if r["method"] == FULL]
        assert len(full) == 2 and {r["rows"] for r in full} == {config.pool_size}
        assert full[0]["noisy_rows"] == int(noisy.sum())
        for run in runs:
            if run["method"] == ORACLE:
                assert run["rows"] == run["target_rows"] == resolve_budget(run["budget"], config.pool_size)
                assert run["noisy_rows"] == 0
            if run["method"] in (FULL, ORACLE):
                continue
            idx = np.asarray(selections[run["method"]][str(run["budget"])])
            assert run["rows"] == len(idx) == resolve_budget(run["budget"], config.pool_size)
            assert run["noisy_rows"] == int(noisy[idx].sum())
            assert run["noisy_fraction"] == pytest.approx(noisy[idx].mean())
            assert run["target_rows"] == int(is_target[idx].sum())
            assert run["duplicate_fraction"] == pytest.approx(np.asarray(pool["is_duplicate"])[idx].mean())
            tasks, counts = np.unique(np.asarray(pool["task"])[idx], return_counts=True)
            assert run["rows_per_task"] == dict(zip(tasks.tolist(), counts.tolist()))
        pool_info = next(p for p in result["pool"] if p["seed"] == seed)
        assert pool_info["noisy_fraction"] == pytest.approx(noisy.mean())


def test_proxy_learning_is_read_from_the_recorded_sweeps(quality):
    """Per sweep: clean rows' mean loss and the AUC of the loss, wrong vs right answers, against the sweep file
    read on its own; for the bench's target and for the largest task (where both kinds of answer occur)."""
    from safetensors.numpy import load_file

    from hf_datasel.store import RunStore

    config, result, root = quality
    for seed in config.seeds:
        pool = seed_data(config, seed)["pool"]
        proxy = Path(config.output_dir) / f"seed-{seed}" / "proxy"
        sweep = load_file(str(proxy / "datasel" / "sweep.safetensors"))
        loss = sweep["loss"][:, np.argsort(sweep["row_id"])]  # row ids are pool positions
        noisy = np.asarray(pool["is_noisy"], bool)
        largest = max(config.task_mix(), key=config.task_mix().get)
        recorded = next(p for p in result["pool"] if p["seed"] == seed)["proxy_learning"]
        for target, got in ((config.target_task, recorded), (largest, None)):
            got = got or proxy_learning(RunStore.for_output_dir(proxy), pool, target)
            is_target = np.asarray(pool["task"]) == target
            assert [g["step"] for g in got] == sweep["steps"].tolist()
            for g, row_loss in zip(got, loss):
                assert g["clean_target_loss"] == pytest.approx(row_loss[is_target & ~noisy].mean(), abs=1e-4)
                assert g["clean_other_loss"] == pytest.approx(row_loss[~is_target & ~noisy].mean(), abs=1e-4)
                both = 0 < (noisy & is_target).sum() < is_target.sum()
                expected = _pairwise_auc(noisy[is_target], row_loss[is_target]) if both else None
                assert g["noisy_vs_clean"] == (pytest.approx(expected, abs=1e-4) if both else None)
            if target == largest:
                assert got[0]["noisy_vs_clean"] is not None
    table = proxy_learning_table(result)
    first = next(p for p in result["pool"] if p["seed"] == config.seeds[0])["proxy_learning"]
    assert f"| {config.seeds[0]} | {first[0]['clean_target_loss']:.2f} / " in table
    assert "Did the proxy learn the target task?" in (root / "docs" / "quality.md").read_text()


def test_quality_summary_is_mean_and_spread_over_seeds(quality):
    config, result, _ = quality
    runs = [r for r in result["runs"] if r["method"] == "s2l" and r["budget"] == 0.5 and r["protocol"] == "steps"]
    values = [r["eval"]["target"]["exact_match"] for r in runs]
    stats = result["summary"]["s2l"]["0.5"]["target_exact_match"]
    assert stats["n"] == len(config.seeds)
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    losses = [r["eval"]["all"]["loss"] for r in runs]
    assert result["summary"]["s2l"]["0.5"]["all_loss"]["min"] == pytest.approx(min(losses))


@pytest.mark.parametrize("model", ["large", "proxy"])
def test_a_cached_base_is_reused_only_for_the_same_corpus_and_stack(quality, monkeypatch, model):
    config, result, root = quality
    cached = quality_module._base_path(config, model)
    assert str(cached) == result["bases"][model]  # the same settings: the same base
    corpus = quality_module.generic_corpus
    monkeypatch.setattr(quality_module, "generic_corpus", lambda n: corpus(n)[::-1])  # same lines, other order
    assert quality_module._base_path(config, model) != cached
    monkeypatch.setattr(quality_module, "generic_corpus", corpus)
    monkeypatch.setattr(quality_module, "library_versions", lambda: {**library_versions(), "trl": "0.0.1"})
    assert quality_module._base_path(config, model) != cached


def test_quality_unknown_variant_or_family_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        run_quality(QualityConfig(variants=("nope",)), write=False)
    with pytest.raises(ValueError, match="unknown pool family"):
        run_quality(QualityConfig(unseen="nope"), write=False)
    assert unseen_config(QualityConfig(unseen=None)) is None


def test_recorder_bench_times_every_step_after_warmup(tmp_path):
    result = run_recorder_bench(steps=4, repeats=2, warmup=1, pool_size=48, workdir=tmp_path)
    for variant in ("plain", "recorder"):
        assert result[variant]["steps_timed"] == 2 * (4 - 1)
        assert len(result[variant]["run_median_step_ms"]) == 2
    ratio = result["recorder"]["median_step_ms"] / result["plain"]["median_step_ms"] - 1
    assert result["overhead"] == pytest.approx(ratio)
    assert result["meets_goal"] == (result["overhead"] <= result["goal_overhead"])
    assert result["sweep_seconds_per_pool"] is not None
    assert result["hook_ms_per_step"] > 0 and result["hook_share_of_plain_step"] > 0


def test_perf_scoring_parts_on_small_inputs(tmp_path):
    config = PerfConfig(
        parts=("s2l_kmeans", "less_scoring"),
        rows=2000,
        trajectory_length=4,
        num_clusters=8,
        dims=16,
        snapshots=2,
        target_rows=4,
        workdir=str(tmp_path),
    )
    out = tmp_path / "perf.json"
    result = run_perf(config, out=out, log=lambda *a: None)
    on_disk = json.loads(out.read_text())
    assert set(on_disk["parts"]) == {"s2l_kmeans", "less_scoring"}
    assert (tmp_path / "perf.md").read_text().count("\n") == 4
    for part in ("s2l_kmeans", "less_scoring"):
        r = result["parts"][part]
        assert "error" not in r, r
        assert r["rows"] == 2000 and r["chosen"] == r["budget"] == 20
        assert r["peak_rss_mib"] > 0
    assert result["parts"]["less_scoring"]["feature_files_mib"] == pytest.approx(2 * 2000 * 16 * 2 / 2**20)


def test_perf_update_keeps_earlier_parts_with_when_and_where_they_were_measured(tmp_path):
    """`--update` reruns some parts into an existing result: the others keep their numbers, their time and their
    machine (the top-level machine is the new run's, which may be another one)."""
    out = tmp_path / "perf.json"
    small = dict(rows=200, trajectory_length=4, num_clusters=4, dims=8, snapshots=1, target_rows=2)
    run_perf(PerfConfig(parts=("s2l_kmeans",), workdir=str(tmp_path), **small), out=out, log=lambda *a: None)
    earlier = json.loads(out.read_text())
    earlier["machine"]["cpu_model"] = "the earlier machine"
    out.write_text(json.dumps(earlier))
    run_perf(
        PerfConfig(parts=("less_scoring",), workdir=str(tmp_path), **small), out=out, log=lambda *a: None, update=True
    )
    merged = json.loads(out.read_text())
    assert set(merged["parts"]) == {"s2l_kmeans", "less_scoring"}
    kept = merged["parts"]["s2l_kmeans"]
    assert {k: v for k, v in kept.items() if k not in ("measured", "machine")} == earlier["parts"]["s2l_kmeans"]
    assert kept["measured"] == earlier["created"] and kept["machine"]["cpu_model"] == "the earlier machine"
    assert merged["machine"]["cpu_model"] != "the earlier machine" and "machine" not in merged["parts"]["less_scoring"]


def test_perf_lm_head_part_compares_the_same_gradients(tmp_path):
    config = PerfConfig(
        lm_head_vocab=300, lm_head_tokens=16, lm_head_batch=2, lm_head_batches=1, lm_head_rounds=1,
        device="cpu", workdir=str(tmp_path),
    )  # fmt: skip
    r = run_part("lm_head", config)
    assert "error" not in r, r
    assert r["max_relative_difference"] < 1e-4 and r["speedup"] > 0
    assert r["settings"]["label_tokens"] == 4 and set(r["peak_extra_memory_mib"]) == set(r["ms_per_batch"])


def test_perf_failed_part_is_reported_not_raised(tmp_path):
    bad = run_part("less_scoring", PerfConfig(rows=10, budget_share=5.0, dims=8, snapshots=1, workdir=str(tmp_path)))
    assert set(bad) == {"error"}
    with pytest.raises(ValueError, match="unknown part"):
        run_part("nope", PerfConfig())


def _pairwise_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """P(a positive row scores above a negative one), ties counting half: the AUC written out."""
    pos, neg = score[positive], score[~positive]
    return float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))


def test_less_separation_is_the_auc_of_the_less_score_combined_and_per_snapshot(tmp_path, tokenizer):
    pool = make_pool(40, noise=0.3, seed=11)
    targets = make_pool(6, noise=0.0, seed=12, tasks=("add",))
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool)
    selection = select_less(SelectionContext(store=store, dataset=pool, budget=4), targets)
    sep = less_separation(store, pool, targets, "add", selection.params)
    train = gradient_features(store, pool, preconditioner="adam", progress=False)  # the cached features
    aligned = gradient_features(store, targets, preconditioner="none", progress=False)
    tasks = np.asarray(targets["task"])
    is_target, noisy = np.asarray(pool["task"]) == "add", np.asarray(pool["is_noisy"], bool)
    assert 0 < (noisy & is_target).sum() < is_target.sum()  # both classes within the target task
    snapshots = [([tr], [tg]) for tr, tg in zip(train, aligned)]
    for got, (tr, tg) in zip([sep["combined"], *sep["snapshots"]], [(train, aligned), *snapshots]):
        score = less_scores(tr, tg, tasks)[0]
        ok = np.isfinite(score)
        within = ok & is_target
        assert got["noisy_vs_clean"] == pytest.approx(_pairwise_auc(noisy[within], score[within]), abs=1e-4)
        assert got["target_vs_rest"] == pytest.approx(_pairwise_auc(is_target[ok], score[ok]), abs=1e-4)
    assert [s["step"] for s in sep["snapshots"]] == [t.step for t in train]
    assert sum(s["weight"] for s in sep["snapshots"]) == pytest.approx(1.0, abs=1e-3)
    table = separation_table({"pool": [{"seed": 7, "less_separation": sep}]})
    c = sep["combined"]
    assert f"| 7 | {c['noisy_vs_clean']:.2f} / {c['target_vs_rest']:.2f} |" in table
    assert f"step {train[0].step} (w " in table.splitlines()[0]
