"""Gradient spectra of clean vs noisy rows after a short warmup of a tiny Llama (CPU, about a minute).

    python examples/gradient_spectra.py [--out docs/spectra.png] [--steps 300]

Trains the embedded tiny model on a synthetic pool with 20 % plausible-but-wrong answers, then
measures per-row q/k/v/o gradient spectra, prints the per-group means and a selection by
effective rank, and saves the per-layer plot.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from hf_datasel import DataSelector, gradient_spectra
from hf_datasel.data import iter_batches, tokenize_rows
from hf_datasel.synthetic import TinyLlamaSpec, build_model, build_tokenizer, make_pool


def warmup(model, tokenizer, pool, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> None:
    """A few hundred AdamW steps on the pool (mean loss over completion tokens)."""
    rows = tokenize_rows(pool, tokenizer, max_length=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        order = torch.randperm(len(rows), generator=generator).tolist()
        shuffled = [rows[i] for i in order]
        for _, batch in iter_batches(shuffled, batch_size, tokenizer.pad_token_id, sort_by_length=False):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 100 == 0:
                print(f"step {step}: loss {loss.item():.3f}")
            if step >= steps:
                break
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/spectra.png")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", type=int, default=240)
    args = parser.parse_args()

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, TinyLlamaSpec(num_hidden_layers=4), seed=0)
    warmup(model, tok, make_pool(2000, noise=0.2, seed=0), args.steps)

    pool = make_pool(args.rows, noise=0.3, seed=1)
    pool = pool.map(lambda r: {"quality": "noisy" if r["is_noisy"] else "clean"})
    spectra = gradient_spectra(model, pool, tokenizer=tok, layers="all", projections=("q", "k", "v", "o"))
    report = spectra.report(group_by="quality")
    print(report[["quality", "layer", "projection", "rows", "nuclear_norm", "effective_rank"]].to_string(index=False))
    for metric in ("nuclear_norm", "effective_rank"):
        score = spectra.summary(metric)
        noisy = np.asarray(pool["is_noisy"])
        print(f"{metric}: clean mean {score[~noisy].mean():.4g}, noisy mean {score[noisy].mean():.4g}")
    selector = DataSelector(pool)
    print(f"pool: {sum(pool['is_noisy'])} noisy rows of {len(pool)}")
    for metric in ("effective_rank", "nuclear_norm"):
        subset = selector.select("spectral", budget=0.5, spectra=spectra, metric=metric)
        direction = selector.last.selection.params["direction"]
        print(f"spectral ({direction} {metric}), half the pool: {sum(subset['is_noisy'])} noisy of {len(subset)}")
    print("saved", spectra.plot(args.out, group_by="quality"))


if __name__ == "__main__":
    main()
