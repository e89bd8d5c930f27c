"""Held-out evaluation used by the demo and the benchmarks: loss and exact match per task."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from datasets import Dataset

from .data import iter_batches, tokenize_rows
from .record.per_sample_loss import per_sample_loss


@torch.no_grad()
def per_row_loss(
    model, tokenizer, dataset: Dataset, batch_size: int = 64, max_length: int | None = 1024
) -> np.ndarray:
    """Completion-token loss of each row, in row order."""
    model.eval()
    rows = tokenize_rows(dataset, tokenizer, max_length)
    out = np.full(len(rows), np.nan)
    for positions, batch in iter_batches(rows, batch_size, tokenizer.pad_token_id):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        out[positions] = per_sample_loss(model(**batch), labels=labels).cpu().numpy()
    return out


@torch.no_grad()
def exact_match(model, tokenizer, dataset: Dataset, batch_size: int = 64) -> np.ndarray:
    """1.0 where greedy decoding after the prompt reproduces the completion exactly, else 0.0."""
    model.eval()
    prompts, answers = list(dataset["prompt"]), list(dataset["completion"])
    hits = np.zeros(len(prompts))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(map(len, encoded))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded], device=model.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        longest = max(
            len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[start : start + batch_size]
        )
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest + 1,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, width:]
        for i, row in enumerate(generated.tolist()):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            hits[start + i] = float(tokenizer.decode(row, skip_special_tokens=True) == answers[start + i])
    return hits


def evaluate_by_task(model, tokenizer, dataset: Dataset) -> dict[str, dict[str, float]]:
    """{task: {"loss": mean loss, "exact_match": mean exact match, "rows": n}} plus an "all" entry."""
    losses = per_row_loss(model, tokenizer, dataset)
    hits = exact_match(model, tokenizer, dataset)
    tasks = list(dataset["task"])
    groups = defaultdict(list)
    for i, task in enumerate(tasks):
        groups[task].append(i)
    groups["all"] = list(range(len(tasks)))
    return {
        task: {"loss": float(np.mean(losses[idx])), "exact_match": float(np.mean(hits[idx])), "rows": len(idx)}
        for task, idx in groups.items()
    }
