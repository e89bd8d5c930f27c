"""The end-to-end demo on the embedded default: record → select → fine-tune a larger model on each subset.

A tiny proxy Llama (from its own pretrained base) trains on a long-tailed, noisy synthetic
instruction mix with `LossRecorderCallback` and `SnapshotCallback`. Two selections, each against
random at the same budget: LESS, targeted at the `val` task (6 % of the pool: the last letter's
digit, next to a larger `lst` task that answers the letter itself) from 32 clean examples of it,
and S2L, with no target (the pool's `task` column as its source, as the authors run it). A larger
tiny Llama with another tokenizer, pretrained once on a generic corpus (cached), is fine-tuned on
each subset for the same number of steps, then evaluated: exact match on the target task and on
all tasks (each task counts equally), with the noisy and target shares of each subset (the
shipped `evaluate` selection statistics).

It is one seed of `hf-datasel bench quality` (the same pool, recipe and evaluation); the
benchmark's means over seeds are the numbers to trust, and agree with these in sign.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .bench.quality import (
    QualityConfig,
    evaluate_large,
    fine_tune,
    pretrained_base,
    record_proxy,
    seed_data,
    subset_stats,
)
from .selector import DataSelector
from .store import write_json


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    pool_size: int = 2000
    noise: float = 0.2
    budget: float = 0.05
    proxy_epochs: int = 5
    large_steps: int = 300
    pretrain_steps: int | None = None  # the base's pretraining (cached); None: 5 × large_steps
    eval_rows: int = 150
    seed: int = 0

    def bench_config(self) -> QualityConfig:
        """The quality benchmark's settings for this demo (one seed, one budget, equal steps)."""
        return QualityConfig(
            pool_size=self.pool_size,
            noise=self.noise,
            budgets=(self.budget,),
            seeds=(self.seed,),
            proxy_epochs=self.proxy_epochs,
            large_steps=self.large_steps,
            pretrain_steps=5 * self.large_steps if self.pretrain_steps is None else self.pretrain_steps,
            eval_rows=self.eval_rows,
            target_examples=32 if self.pool_size >= 500 else 4,
            output_dir=self.output_dir,
            unseen=None,
        )


def run_demo(config: DemoConfig | None = None, console: Console | None = None) -> dict:
    """Run the demo and return its results (also written to `<output_dir>/results.json`)."""
    config = config or DemoConfig()
    console = console or Console()
    import datasets
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast as two, and two thrash on a busy machine
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the demo's own sections say what is happening; no per-map bars
    hf_logging.disable_progress_bar()  # (the featurizer's bars follow this switch too)
    try:
        return _run(config, console)
    finally:
        torch.set_num_threads(threads)
        if bars:
            datasets.enable_progress_bars()
        hf_logging.enable_progress_bar()


def _run(config: DemoConfig, console: Console) -> dict:
    bench = config.bench_config()
    out = Path(config.output_dir)
    started = time.time()
    data = seed_data(bench, config.seed)
    pool = data["pool"]

    console.rule("1. record: proxy model with LossRecorderCallback and SnapshotCallback")
    record_proxy(bench, pool, config.seed, out / "proxy")

    console.rule(f"2. select {config.budget:.0%}: LESS (targeted at '{bench.target_task}'), S2L (no target), random")
    selector = DataSelector.from_run(out / "proxy", dataset=pool)
    subsets = {
        "less": selector.run("less", config.budget, seed=config.seed, targets=data["targets"]).indices,
        "s2l": selector.run("s2l", config.budget, seed=config.seed, stratify_by="task").indices,
        "random": selector.run("random", config.budget, seed=config.seed).indices,
    }

    console.rule("3. fine-tune a larger, pretrained model with another tokenizer on each subset")
    base = pretrained_base(bench, log=console.print)
    results: dict = {}
    for name, idx in subsets.items():
        model, tokenizer, _, _ = fine_tune(bench, pool.select(idx.tolist()), "steps", config.seed, base)
        stats = subset_stats(pool, idx.tolist(), bench.target_task)
        results[name] = {
            "rows": stats["rows"],
            "noisy_fraction": stats["noisy_fraction"],
            "target_fraction": stats["target_fraction"],
            "rows_per_task": stats["rows_by_source"],
            "eval": evaluate_large(model, tokenizer, data["target_eval"], data["all_eval"], bench.target_task),
        }
    results["pool"] = {
        "noisy_fraction": stats["pool_noisy_fraction"],
        "target_fraction": stats["pool_target_fraction"],
    }
    results["target_task"] = bench.target_task
    results["seconds"] = round(time.time() - started, 1)
    write_json(out / "results.json", results)
    _print_results(console, results, out / "results.json")
    return results


def _print_results(console: Console, results: dict, path: Path) -> None:
    target = results["target_task"]
    table = Table(title="held-out eval of the fine-tuned large model, by training subset (same budget, same steps)")
    for column in ("subset", f"{target} EM ↑", "all-task EM ↑", "noisy rows", f"{target} rows"):
        table.add_column(column, justify="left" if column == "subset" else "right")
    for name in ("less", "s2l", "random"):
        r = results[name]
        table.add_row(
            f"{name} ({r['rows']} rows)",
            f"{r['eval']['target']['exact_match']:.2f}",
            f"{r['eval']['all']['exact_match']:.2f}",
            f"{r['noisy_fraction']:.0%}",
            f"{r['target_fraction']:.0%}",
        )
    pool = results["pool"]
    table.add_row("pool", "", "", f"{pool['noisy_fraction']:.0%}", f"{pool['target_fraction']:.0%}")
    console.print(table)
    rnd = results["random"]["eval"]
    less = results["less"]["eval"]["target"]["exact_match"] - rnd["target"]["exact_match"]
    s2l = results["s2l"]["eval"]["all"]["exact_match"] - rnd["all"]["exact_match"]
    console.print(f"LESS vs random, {target} exact match: {less:+.2f}; S2L vs random, all-task EM: {s2l:+.2f}")
    console.print(f"done in {results['seconds']} s; results in {path}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps({k: run_demo()[k]["eval"]["all"] for k in ("less", "s2l", "random")}))


if __name__ == "__main__":
    main()
