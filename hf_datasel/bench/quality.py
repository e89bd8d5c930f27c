"""Selection quality: does a subset chosen by each method teach a larger model the target task?

    hf-datasel bench quality                 # quick mode (3 seeds, 5/10/25 %), ≤ 20 min on a 2-core CPU
    hf-datasel bench quality --mode full     # 5 seeds, larger pool and eval sets
    python -m hf_datasel.bench.quality --mode quick

Per seed:

1. a synthetic multi-task pool (`make_pool`) with plausible wrong answers on a `noise` share
   of the rows; one task is the *target* (clean held-out rows of it are the evaluation set,
   a few more clean rows are the target examples the gradient methods score against);
2. a tiny proxy Llama (char tokenizer) trains on the pool with `LossRecorderCallback`
   (per-row losses + a loss sweep at every save) and `SnapshotCallback` (weights + Adam
   moments at every save), exactly as a user would record;
3. every method in `hf_datasel.METHODS` (loss in its three variants) selects 5 %, 10 % and
   25 % of the pool; a method that cannot run here is listed under `skipped` with the reason;
4. a larger tiny Llama with a different (BPE) tokenizer trains from the same initial weights
   for the same number of steps on each subset and on the full pool, then is evaluated on
   the target task (loss, exact match) and on all tasks (loss, exact match).

The numbers, per-seed runs and their mean/std over seeds go to `docs/bench/quality.json`,
the plot to `docs/bench/quality.png`, a markdown table to `docs/bench/quality.md`.

Calibration (why these defaults): the target is `sort`, the one task the large model learns
from scratch within 300 steps (600 clean sort rows alone: exact match 0.51; copy 0.16-0.23,
reverse 0.15, add 0.05). A generic pretraining of the large model was tried and left out:
1 500 steps on the other three tasks lowered the sort exact match after 300 fine-tuning steps
from 0.51 to 0.27. The large model therefore starts from the same random weights for every
subset of a seed. Budgets are shares of the pool; every subset gets the same step count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers.utils import logging as hf_logging
from trl import SFTTrainer

from ..data import pad_batch, tokenize_rows
from ..evaluation import evaluate_by_task
from ..methods import METHODS
from ..record import LossRecorderCallback
from ..record.snapshot import SnapshotCallback
from ..rows import with_row_ids
from ..selector import DataSelector, resolve_budget
from ..store import write_json
from ..synthetic import LARGE, PROXY, TASKS, build_model, build_tokenizer, make_pool, tiny_sft_config
from .recorder import machine

TARGETS = object()  # placeholder in a variant's parameters for the target examples
SPECTRA = object()  # placeholder for the spectra computed once per seed

# name shown in tables -> (registry method, parameters)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("random", {}),
    "loss-highest": ("loss", {"which": "highest"}),
    "loss-lowest": ("loss", {"which": "lowest"}),
    "loss-middle": ("loss", {"which": "middle"}),
    "s2l": ("s2l", {}),
    "less": ("less", {"targets": TARGETS}),
    "g2is": ("g2is", {"targets": TARGETS}),
    "spectral": ("spectral", {"spectra": SPECTRA}),
}
FULL = "full pool"


@dataclass
class QualityConfig:
    """Settings of one quality benchmark run (the defaults are the quick mode)."""

    mode: str = "quick"
    pool_size: int = 2000
    noise: float = 0.2
    target_task: str = "sort"
    target_weight: float | None = None  # the target's share of the pool; None: all tasks alike
    budgets: tuple[float, ...] = (0.05, 0.1, 0.25)
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] | None = None  # None: every variant whose method is registered
    proxy_epochs: int = 2
    saves_per_epoch: int = 2
    large_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    max_length: int = 48
    target_examples: int = 32
    eval_rows: int = 200
    large_vocab_size: int = 64
    workers: int = 2  # large-model trainings run in this many single-thread processes
    snapshots_per_epoch: int = 1
    output_dir: str = "runs/bench/quality"
    results_dir: str = "docs/bench"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> QualityConfig:
        """`quick` (the defaults) or `full` (5 seeds, larger pool and evaluation sets)."""
        if mode == "quick":
            return cls(**overrides)
        if mode == "full":
            base = dict(mode="full", pool_size=4000, seeds=(0, 1, 2, 3, 4), eval_rows=400, target_examples=64)
            return cls(**{**base, **overrides})
        raise ValueError(f"mode must be 'quick' or 'full', not {mode!r}")

    def task_weights(self) -> tuple[float, ...] | None:
        if self.target_weight is None:
            return None
        rest = (1.0 - self.target_weight) / (len(TASKS) - 1)
        return tuple(self.target_weight if t == self.target_task else rest for t in TASKS)


def available_variants(config: QualityConfig) -> tuple[list[str], dict[str, str]]:
    """Variants to run, and the ones left out with the reason."""
    names = list(config.variants or VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    run, skipped = [], {}
    for name in names:
        method = VARIANTS[name][0]
        if method in METHODS:
            run.append(name)
        else:
            skipped[name] = f"method {method!r} is not in hf_datasel.METHODS"
    return run, skipped


# -- training and evaluation ----------------------------------------------------------


def train_causal_lm(
    model: torch.nn.Module,
    tokenizer,
    dataset: Dataset,
    steps: int,
    *,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
) -> float:
    """`steps` AdamW steps (5 % warmup, cosine decay) on `dataset`, reshuffled every epoch; returns seconds.

    Rows are tokenized the way SFTTrainer does (prompt + completion + EOS, loss on the completion).
    """
    rows = tokenize_rows(dataset, tokenizer, max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, int(0.05 * steps))

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    queue: list[int] = []
    started = time.perf_counter()
    for _ in range(steps):
        while len(queue) < batch_size:
            queue += rng.sample(range(len(rows)), len(rows))
        batch, queue = queue[:batch_size], queue[batch_size:]
        loss = model(**pad_batch([rows[i] for i in batch], tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - started


def _record_proxy(config: QualityConfig, pool: Dataset, seed: int, out: Path):
    """Train the proxy on the pool with the recording callbacks; return (model, tokenizer, callbacks used)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, PROXY, seed=seed)
    steps_per_epoch = -(-len(pool) // config.batch_size)
    save_steps = max(1, steps_per_epoch // config.saves_per_epoch)
    every = max(1, steps_per_epoch // config.snapshots_per_epoch)
    snapshot_steps = list(range(every, steps_per_epoch * config.proxy_epochs + 1, every))
    callbacks: list[Any] = [LossRecorderCallback(sweep_steps="saves"), SnapshotCallback(steps=snapshot_steps)]
    used = ["LossRecorderCallback(sweep_steps='saves')", f"SnapshotCallback(steps={snapshot_steps})"]
    args = tiny_sft_config(
        out,
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.proxy_epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=10_000,
        max_length=config.max_length,
        save_strategy="steps",
        save_steps=save_steps,
        save_only_model=True,
        save_total_limit=1,
        seed=seed,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=with_row_ids(pool), processing_class=tokenizer, callbacks=callbacks
    )
    trainer.train()
    callbacks[0].detach()
    return trainer.model, tokenizer, used


def _evaluate(model, tokenizer, target_eval: Dataset, all_eval: Dataset, target: str) -> dict[str, dict[str, float]]:
    tgt = evaluate_by_task(model, tokenizer, target_eval)[target]
    every = evaluate_by_task(model, tokenizer, all_eval)["all"]
    return {
        "target": {"loss": tgt["loss"], "exact_match": tgt["exact_match"]},
        "all": {"loss": every["loss"], "exact_match": every["exact_match"]},
    }


def _fill(params: dict[str, Any], targets: Dataset, spectra_fn) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if value is TARGETS:
            value = targets
        elif value is SPECTRA:
            value = spectra_fn()
        out[key] = value
    return out


def _describe(params: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ("<target examples>" if v is TARGETS else "<spectra>" if v is SPECTRA else v) for k, v in params.items()
    }


# -- one seed ---------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def seed_data(
    pool_size: int,
    noise: float,
    seed: int,
    task_weights: tuple[float, ...] | None,
    target: str,
    target_examples: int,
    eval_rows: int,
) -> dict[str, Dataset]:
    """The pool, the target examples and the two evaluation sets of one seed (pure functions of the seed)."""
    return {
        "pool": make_pool(pool_size, noise=noise, seed=seed, task_weights=task_weights),
        "targets": make_pool(target_examples, tasks=(target,), noise=0.0, seed=seed + 1000),
        "target_eval": make_pool(eval_rows, tasks=(target,), noise=0.0, seed=seed + 2000),
        "all_eval": make_pool(eval_rows, noise=0.0, seed=seed + 3000),
    }


def _data(config: QualityConfig, seed: int) -> dict[str, Dataset]:
    return seed_data(
        config.pool_size,
        config.noise,
        seed,
        config.task_weights(),
        config.target_task,
        config.target_examples,
        config.eval_rows,
    )


def select_seed(
    config: QualityConfig, seed: int, variants: list[str], skipped: dict[str, str], log=print
) -> tuple[list[dict], dict]:
    """Record the proxy run and select with every variant at every budget: (training jobs, pool info)."""
    out = Path(config.output_dir) / f"seed-{seed}"
    data = _data(config, seed)
    pool = data["pool"]
    started = time.perf_counter()
    proxy, proxy_tok, callbacks = _record_proxy(config, pool, seed, out / "proxy")
    record_seconds = time.perf_counter() - started
    log(f"seed {seed}: recorded the proxy run in {record_seconds:.0f} s ({', '.join(callbacks)})")
    selector = DataSelector.from_run(out / "proxy", dataset=pool)

    spectra_cache: dict[str, Any] = {}

    def spectra_fn():
        if "spectra" not in spectra_cache:
            from ..spectra import gradient_spectra

            spectra_cache["spectra"] = gradient_spectra(proxy, pool, proxy_tok)
        return spectra_cache["spectra"]

    jobs: list[dict] = []
    for name in variants:
        if name in skipped:
            continue
        method, params = VARIANTS[name]
        done = []
        for budget in config.budgets:
            t0 = time.perf_counter()
            try:
                selection = selector.run(method, budget, seed=seed, **_fill(params, data["targets"], spectra_fn))
            except Exception as err:  # noqa: BLE001 - a method that cannot run is reported, not fatal
                skipped[name] = f"{type(err).__name__}: {err}"[:300]
                log(f"seed {seed}: {name} skipped ({skipped[name]})")
                done = []
                break
            seconds = time.perf_counter() - t0
            done.append({"seed": seed, "method": name, "budget": budget, "indices": selection.indices.tolist()})
            done[-1]["select_seconds"] = round(seconds, 3)
            log(f"seed {seed}: {name} selected {len(selection.indices)} rows at {budget:.0%} in {seconds:.1f} s")
        jobs += done
    jobs.append(
        {"seed": seed, "method": FULL, "budget": 1.0, "indices": list(range(len(pool))), "select_seconds": 0.0}
    )
    by_method: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for job in jobs:
        if job["method"] != FULL:
            by_method[job["method"]][str(job["budget"])] = job["indices"]
    write_json(out / "selections.json", by_method)
    noisy = np.asarray(pool["is_noisy"], bool)
    is_target = np.asarray(pool["task"]) == config.target_task
    pool_info = {
        "seed": seed,
        "rows": len(pool),
        "noisy_rows": int(noisy.sum()),
        "noisy_fraction": float(noisy.mean()),
        "target_rows": int(is_target.sum()),
        "target_fraction": float(is_target.mean()),
        "record_seconds": round(record_seconds, 1),
    }
    return jobs, pool_info


def train_job(config: QualityConfig, job: dict, threads: int | None = None) -> dict:
    """Train the large model from its seed's initial weights on one subset and evaluate it: one run's numbers."""
    if threads:
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    seed, name, budget = job["seed"], job["method"], job["budget"]
    data = _data(config, seed)
    pool = data["pool"]
    idx = np.asarray(job["indices"], np.int64)
    large_tok = build_tokenizer(vocab_size=config.large_vocab_size)
    model = build_model(large_tok, LARGE, seed=seed)  # same initial weights for every subset of a seed
    seconds = train_causal_lm(
        model,
        large_tok,
        pool.select(idx.tolist()),
        config.large_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        seed=seed,
    )
    evaluation = _evaluate(model, large_tok, data["target_eval"], data["all_eval"], config.target_task)
    noisy = np.asarray(pool["is_noisy"], bool)
    is_target = np.asarray(pool["task"]) == config.target_task
    return {
        "seed": seed,
        "method": name,
        "budget": budget,
        "rows": int(len(idx)),
        "budget_rows": resolve_budget(budget, len(pool)) if name != FULL else len(pool),
        "noisy_rows": int(noisy[idx].sum()),
        "noisy_fraction": float(noisy[idx].mean()),
        "target_rows": int(is_target[idx].sum()),
        "target_fraction": float(is_target[idx].mean()),
        "eval": evaluation,
        "train_seconds": round(seconds, 2),
        "select_seconds": job["select_seconds"],
    }


def _run_line(run: dict) -> str:
    ev = run["eval"]
    return (
        f"seed {run['seed']} {run['method']:>13} @ {run['budget']:>4.0%}: target EM {ev['target']['exact_match']:.2f} "
        f"loss {ev['target']['loss']:.3f} | all loss {ev['all']['loss']:.3f} | noisy {run['noisy_fraction']:.0%} "
        f"target {run['target_fraction']:.0%} ({run['train_seconds']:.0f} s)"
    )


def _select_in_worker(config: QualityConfig, seed: int, variants: list[str]) -> tuple[list[dict], dict, dict]:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    skipped: dict[str, str] = {}
    jobs, pool_info = select_seed(config, seed, variants, skipped, log=lambda m: print(m, flush=True))
    return jobs, pool_info, skipped


def run_all(
    config: QualityConfig, variants: list[str], skipped: dict[str, str], log=print
) -> tuple[list[dict], list[dict]]:
    """Select and train for every seed: (runs, pool infos).

    With `config.workers > 1`, each seed's recording + selection and each training run is a task
    for a pool of single-thread processes (tiny models use one core far better than two), and a
    seed's trainings start as soon as its selections are ready.
    """
    runs: list[dict] = []
    pools: list[dict] = []
    if config.workers <= 1:
        jobs = []
        for seed in config.seeds:
            seed_jobs, pool_info = select_seed(config, seed, variants, skipped, log=log)
            jobs += seed_jobs
            pools.append(pool_info)
        for job in jobs:
            if job["method"] not in skipped:
                runs.append(train_job(config, job))
                log(_run_line(runs[-1]))
        return runs, pools
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=config.workers, mp_context=ctx) as executor:
        pending = {executor.submit(_select_in_worker, config, seed, variants): None for seed in config.seeds}
        while pending:
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                if job is None:
                    jobs, pool_info, seed_skipped = future.result()
                    skipped.update(seed_skipped)
                    pools.append(pool_info)
                    for job in jobs:
                        if job["method"] not in skipped:
                            pending[executor.submit(train_job, config, job, 1)] = job
                else:
                    runs.append(future.result())
                    log(_run_line(runs[-1]))
    order = {name: i for i, name in enumerate([*variants, FULL])}
    runs = [r for r in runs if r["method"] not in skipped]  # a method that failed on a later seed
    runs.sort(key=lambda r: (r["seed"], order[r["method"]], r["budget"]))
    pools.sort(key=lambda p: p["seed"])
    return runs, pools


# -- aggregation, tables, plot ------------------------------------------------------------

METRICS = {
    "target_exact_match": ("eval", "target", "exact_match"),
    "target_loss": ("eval", "target", "loss"),
    "all_loss": ("eval", "all", "loss"),
    "all_exact_match": ("eval", "all", "exact_match"),
    "noisy_fraction": ("noisy_fraction",),
    "target_fraction": ("target_fraction",),
    "rows": ("rows",),
}


def _get(run: dict, path: tuple[str, ...]) -> float:
    value: Any = run
    for key in path:
        value = value[key]
    return float(value)


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{method: {budget: {metric: {mean, std, min, max, n}}}} over seeds (std with ddof=1 when n > 1)."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["method"], run["budget"])].append(run)
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = defaultdict(dict)
    for (method, budget), group in groups.items():
        stats = {}
        for metric, path in METRICS.items():
            values = np.array([_get(r, path) for r in group])
            stats[metric] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "min": float(values.min()),
                "max": float(values.max()),
                "n": int(len(values)),
            }
        out[method][f"{budget:g}"] = stats
    return dict(out)


def _methods(summary: dict[str, Any]) -> list[str]:
    """Methods of a summary in the order of `VARIANTS` (JSON round trips sort keys), full pool left out."""
    return [n for n in VARIANTS if n in summary] + sorted(n for n in summary if n not in VARIANTS and n != FULL)


def _cell(stats: dict[str, float], pct: bool = False) -> str:
    if pct:
        return f"{stats['mean']:.0%} ± {stats['std']:.0%}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def markdown_table(result: dict[str, Any], budget: float = 0.1) -> str:
    """One row per method at `budget`, plus the full pool: mean ± std over seeds."""
    summary, key = result["summary"], f"{budget:g}"
    lines = [
        f"| method ({budget:.0%} of the pool) | target EM ↑ | target loss ↓ | all-task loss ↓ "
        "| noisy rows | target rows |",
        "|---|---|---|---|---|---|",
    ]
    names = [m for m in _methods(summary) if key in summary[m]] + [FULL]
    for name in names:
        stats = summary[name].get(key) if name != FULL else summary[FULL]["1"]
        if stats is None:
            continue
        label = name if name != FULL else "full pool (100 %)"
        lines.append(
            f"| {label} | {_cell(stats['target_exact_match'])} | {_cell(stats['target_loss'])} | "
            f"{_cell(stats['all_loss'])} | {_cell(stats['noisy_fraction'], True)} | "
            f"{_cell(stats['target_fraction'], True)} |"
        )
    return "\n".join(lines)


def budget_table(result: dict[str, Any], metric: str = "target_exact_match") -> str:
    """`metric` (mean ± std) per method and budget."""
    summary = result["summary"]
    budgets = [f"{b:g}" for b in result["settings"]["budgets"]]
    lines = ["| method | " + " | ".join(f"{float(b):.0%}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name in _methods(summary):
        by_budget = summary[name]
        lines.append(
            f"| {name} | " + " | ".join(_cell(by_budget[b][metric]) if b in by_budget else "–" for b in budgets) + " |"
        )
    full = summary[FULL]["1"][metric]
    lines.append(f"| full pool | {_cell(full)} (100 %) |" + " |" * (len(budgets) - 1))
    return "\n".join(lines)


def plot_quality(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Metric vs budget, one line per method (mean ± std over seeds); the full pool as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("target_exact_match", "target-task exact match ↑"),
        ("target_loss", "target-task eval loss ↓"),
        ("all_loss", "all-task eval loss ↓"),
        ("noisy_fraction", "noisy rows in the subset"),
    ]
    summary = result["summary"]
    fig, grid = plt.subplots(2, 2, figsize=(11, 8))
    axes = grid.ravel()
    for ax, (metric, title) in zip(axes, panels):
        for name in _methods(summary):
            by_budget = summary[name]
            budgets = sorted(by_budget, key=float)
            xs = [100 * float(b) for b in budgets]
            means = [by_budget[b][metric]["mean"] for b in budgets]
            stds = [by_budget[b][metric]["std"] for b in budgets]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
        full = summary[FULL]["1"][metric]
        ax.axhline(full["mean"], color="black", linestyle="--", linewidth=1, label="full pool (100 %)")
        ax.set_xscale("log")
        budgets_pct = [100 * b for b in result["settings"]["budgets"]]
        ax.set_xticks(budgets_pct)
        ax.set_xticklabels([f"{b:g} %" for b in budgets_pct])
        ax.minorticks_off()
        ax.set_xlabel("subset size (share of the pool)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(
        f"{s['mode']} mode: pool {s['pool_size']} rows, {s['noise']:.0%} wrong answers, "
        f"target task '{s['target_task']}', "
        f"{s['large_steps']} steps per subset, {len(s['seeds'])} seeds (mean ± std)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def goals(result: dict[str, Any], budget: float = 0.1) -> dict[str, Any]:
    """The checks the issue asks for, computed from the summary (a value and whether it holds)."""
    summary, key = result["summary"], f"{budget:g}"
    full = summary[FULL]["1"]
    random_ = summary.get("random", {}).get(key)
    out: dict[str, Any] = {"budget": budget}
    if random_ is None:
        return out
    for name in ("less", "g2is"):
        stats = summary.get(name, {}).get(key)
        if stats is None:
            continue
        em, rnd, ful = (
            stats["target_exact_match"]["mean"],
            random_["target_exact_match"]["mean"],
            full["target_exact_match"]["mean"],
        )
        spread = stats["target_exact_match"]["std"] + random_["target_exact_match"]["std"]
        out[f"{name}_beats_random_target_em"] = {"value": em - rnd, "holds": bool(em - rnd > spread)}
        out[f"{name}_vs_full_target_em"] = {"value": em - ful, "holds": bool(em >= 0.9 * ful)}
    if "s2l" in summary and key in summary["s2l"]:
        gap_s2l = summary["s2l"][key]["all_loss"]["mean"] - full["all_loss"]["mean"]
        gap_rnd = random_["all_loss"]["mean"] - full["all_loss"]["mean"]
        out["s2l_closer_to_full_all_loss_than_random"] = {
            "value": {"s2l_gap": gap_s2l, "random_gap": gap_rnd},
            "holds": bool(gap_s2l < gap_rnd),
        }
    pool_noise = float(np.mean([p["noisy_fraction"] for p in result["pool"]]))
    out["noisy_fraction_below_pool"] = {
        name: {
            "value": by_budget[key]["noisy_fraction"]["mean"],
            "holds": bool(by_budget[key]["noisy_fraction"]["mean"] < pool_noise),
        }
        for name, by_budget in summary.items()
        if name not in (FULL, "random") and key in by_budget
    }
    return out


# -- entry point -----------------------------------------------------------------------


def run_quality(config: QualityConfig | None = None, log=print, write: bool = True) -> dict[str, Any]:
    """Run the benchmark; write JSON, plot and markdown table under `config.results_dir` (when `write`)."""
    config = config or QualityConfig()
    if config.target_task not in TASKS:
        raise ValueError(f"target_task must be one of {TASKS}, not {config.target_task!r}")
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    variants, skipped = available_variants(config)
    started = time.perf_counter()
    runs, pools = run_all(config, variants, skipped, log=log)
    settings = asdict(config)
    settings["budgets"] = list(config.budgets)
    settings["seeds"] = list(config.seeds)
    settings["variants"] = {n: {"method": VARIANTS[n][0], "params": _describe(VARIANTS[n][1])} for n in variants}
    settings["proxy"] = asdict(PROXY)
    settings["large"] = asdict(LARGE)
    result = {
        "benchmark": "selection_quality",
        "settings": settings,
        "machine": machine(),
        "pool": pools,
        "runs": runs,
        "summary": summarize(runs),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result["goals"] = goals(result)
    if write:
        stem = "quality" if config.mode == "quick" else f"quality-{config.mode}"
        write_json(Path(config.results_dir) / f"{stem}.json", result)
        write_reports(result, Path(config.results_dir) / stem)
    return result


def write_reports(result: dict[str, Any], stem: Path) -> None:
    """`<stem>.png` (the plot) and `<stem>.md` (the tables) from a result (fresh or read back from JSON)."""
    plot_quality(result, stem.with_suffix(".png"))
    stem.with_suffix(".md").write_text(
        markdown_table(result)
        + "\n\nTarget-task exact match by budget:\n\n"
        + budget_table(result)
        + "\n\nAll-task eval loss by budget:\n\n"
        + budget_table(result, "all_loss")
        + "\n\nNoisy rows in the subset by budget (pool: "
        + f"{np.mean([p['noisy_fraction'] for p in result['pool']]):.1%}):\n\n"
        + budget_table(result, "noisy_fraction")
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["quick", "full"], default="quick")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--variants", nargs="+")
    parser.add_argument("--large-steps", type=int)
    parser.add_argument("--pool-size", type=int)
    parser.add_argument("--results-dir")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plot and tables of an earlier result")
    args = parser.parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        write_reports(result, Path(args.replot).with_suffix(""))
        print(markdown_table(result))
        return
    overrides: dict[str, Any] = {}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.variants:
        overrides["variants"] = tuple(args.variants)
    if args.large_steps:
        overrides["large_steps"] = args.large_steps
    if args.pool_size:
        overrides["pool_size"] = args.pool_size
    if args.results_dir:
        overrides["results_dir"] = args.results_dir
    result = run_quality(QualityConfig.for_mode(args.mode, **overrides))
    print(markdown_table(result))
    print(json.dumps(result["goals"], indent=1))


if __name__ == "__main__":
    main()
