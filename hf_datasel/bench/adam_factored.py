"""How close "adam_factored" comes to exact Adam: per-row cosine of the features, overlap of LESS selections.

    python -m hf_datasel.bench.adam_factored [--pool 600] [--steps 60] [--out docs/bench/adam_factored.json]

A tiny full Llama (all parameters trainable) is trained with AdamW by a real SFTTrainer run with
`SnapshotCallback`, on the embedded pool; then, through the public API, exact features (`k=None`) of
the pool under "adam" and "adam_factored" are compared row by row (cosine), and LESS selects the
top 5 / 10 / 25 % against the target task under each form (share of rows both pick).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

BUDGETS = (0.05, 0.1, 0.25)


def run(pool_size: int = 600, steps: int = 60, target_task: str = "sort", seed: int = 0) -> dict:
    from trl import SFTTrainer

    from .. import DataSelector, SnapshotCallback, with_row_ids
    from ..featurize import gradient_features
    from ..store import RunStore
    from ..synthetic import build_model, build_tokenizer, make_pool
    from ..synthetic.training import tiny_sft_config

    tok = build_tokenizer()
    pool = make_pool(pool_size, noise=0.2, seed=seed)
    targets = make_pool(60, noise=0.0, seed=seed + 1000)
    targets = targets.filter(lambda r: r["task"] == target_task)
    with tempfile.TemporaryDirectory() as tmp:
        args = tiny_sft_config(tmp, max_steps=steps, learning_rate=1e-3, seed=seed)
        snapshots = SnapshotCallback(steps=[steps // 2, steps])
        trainer = SFTTrainer(
            model=build_model(tok, seed=seed), args=args, train_dataset=with_row_ids(pool),
            processing_class=tok, callbacks=[snapshots],
        )  # fmt: skip
        trainer.train()
        store = RunStore.for_output_dir(tmp)
        model = trainer.model
        exact = {
            form: gradient_features(store, pool, preconditioner=form, k=None, dtype="float32", model=model,
                                    progress=False)
            for form in ("adam", "adam_factored")
        }  # fmt: skip
        cosines = []
        for a, f in zip(exact["adam"], exact["adam_factored"]):
            ua, uf = np.asarray(a.unit, np.float64), np.asarray(f.unit, np.float64)
            ok = np.isfinite(a.norms) & np.isfinite(f.norms) & (a.norms > 0) & (f.norms > 0)
            cosines.append((ua[ok] * uf[ok]).sum(1))
        selector = DataSelector.from_run(tmp, dataset=pool)
        overlap = {}
        for budget in BUDGETS:
            picks = {
                form: set(selector.run("less", budget, targets=targets, k=8192, adam_form=form, model=model).indices)
                for form in ("adam", "adam_factored")
            }
            overlap[str(budget)] = len(picks["adam"] & picks["adam_factored"]) / max(1, len(picks["adam"]))
    cos = np.concatenate(cosines)
    return {
        "model": "tiny Llama (embedded PROXY), full fine-tuning",
        "pool_rows": pool_size,
        "train_steps": steps,
        "snapshots": [steps // 2, steps],
        "feature_cosine_adam_factored_vs_adam": {
            "mean": float(cos.mean()),
            "p10": float(np.quantile(cos, 0.1)),
            "min": float(cos.min()),
        },
        "less_top_overlap": overlap,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=600)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="docs/bench/adam_factored.json")
    a = parser.parse_args(argv)
    result = run(a.pool, a.steps)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
