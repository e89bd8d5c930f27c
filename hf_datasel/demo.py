"""The end-to-end demo on the embedded default: record → select → train a larger model on each subset.

A tiny proxy Llama trains on a noisy synthetic pool with `LossRecorderCallback`; S2L and a
random baseline each pick 20 %; a larger tiny Llama with a different tokenizer trains on
each subset for the same number of steps; held-out loss and exact match are printed per task.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from trl import SFTConfig, SFTTrainer

from .evaluation import evaluate_by_task
from .record import LossRecorderCallback
from .rows import with_row_ids
from .selector import DataSelector
from .store import write_json
from .synthetic import LARGE, PROXY, build_model, build_tokenizer, make_pool, save_and_reload, tiny_sft_config


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    pool_size: int = 2000
    noise: float = 0.2
    budget: float = 0.2
    proxy_epochs: int = 2
    large_steps: int = 300
    eval_rows: int = 200
    seed: int = 0


def _sft_args(output_dir: Path, **kwargs) -> SFTConfig:
    return tiny_sft_config(output_dir, lr_scheduler_type="cosine", warmup_steps=0.05, **kwargs)


def run_demo(config: DemoConfig | None = None, console: Console | None = None) -> dict:
    """Run the demo and return its results (also written to `<output_dir>/results.json`)."""
    config = config or DemoConfig()
    console = console or Console()
    out = Path(config.output_dir)
    started = time.time()

    pool = make_pool(config.pool_size, noise=config.noise, seed=config.seed)
    evals = make_pool(config.eval_rows, noise=0.0, seed=config.seed + 1)

    console.rule("1. record: proxy model with LossRecorderCallback")
    proxy, proxy_tok = save_and_reload(
        build_model(build_tokenizer(), PROXY, seed=config.seed), build_tokenizer(), out / "proxy-init"
    )
    steps_per_epoch = -(-len(pool) // 16)
    args = _sft_args(
        out / "proxy",
        num_train_epochs=config.proxy_epochs,
        save_strategy="steps",
        save_steps=max(1, steps_per_epoch // 2),
        save_only_model=True,
        save_total_limit=1,
        seed=config.seed,
    )
    recorder = LossRecorderCallback(sweep_steps="saves")
    SFTTrainer(
        model=proxy, args=args, train_dataset=with_row_ids(pool), processing_class=proxy_tok, callbacks=[recorder]
    ).train()

    console.rule("2. select: S2L and random, same budget")
    selector = DataSelector.from_run(out / "proxy", dataset=pool)
    subsets = {
        "s2l": selector.select("s2l", budget=config.budget, seed=config.seed),
        "random": selector.select("random", budget=config.budget, seed=config.seed),
    }

    console.rule("3. train: a larger model with another tokenizer on each subset")
    large_tok = build_tokenizer(vocab_size=64)
    results = {}
    for name, subset in subsets.items():
        model = build_model(large_tok, LARGE, seed=config.seed)
        args = _sft_args(out / f"large-{name}", max_steps=config.large_steps, seed=config.seed)
        SFTTrainer(model=model, args=args, train_dataset=subset, processing_class=large_tok).train()
        results[name] = {
            "rows": len(subset),
            "noisy_fraction": float(sum(subset["is_noisy"]) / len(subset)),
            "eval": evaluate_by_task(model, large_tok, evals),
        }

    results["pool_noisy_fraction"] = float(sum(pool["is_noisy"]) / len(pool))
    results["seconds"] = round(time.time() - started, 1)
    write_json(out / "results.json", results)
    _print_results(console, results, subsets)
    return results


def _print_results(console: Console, results: dict, subsets: dict) -> None:
    tasks = [t for t in results["s2l"]["eval"] if t != "all"] + ["all"]
    table = Table(title="held-out eval of the large model, by training subset (loss ↓ / exact match ↑)")
    table.add_column("task")
    for name in subsets:
        table.add_column(f"{name} loss", justify="right")
        table.add_column(f"{name} EM", justify="right")
    for task in tasks:
        cells = []
        for name in subsets:
            ev = results[name]["eval"][task]
            cells += [f"{ev['loss']:.3f}", f"{ev['exact_match']:.2f}"]
        table.add_row(task, *cells)
    console.print(table)
    for name in subsets:
        r = results[name]
        console.print(
            f"{name}: {r['rows']} rows, {r['noisy_fraction']:.0%} noisy (pool: {results['pool_noisy_fraction']:.0%})"
        )
    console.print(f"done in {results['seconds']} s; results in results.json")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(run_demo()["s2l"]["eval"]["all"]))


if __name__ == "__main__":
    main()
