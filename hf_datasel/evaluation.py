"""Held-out evaluation used by the demo and the benchmarks: loss and exact match per task.

Exact match is scored by the `evaluate` metric that ships with the package
(`evaluate.load(hf_datasel.metrics.EXACT_MATCH)`), so a user's own eval loop that feeds it the
same generations gets the same numbers. What `evaluate` cannot do lives here: greedy generation
of the answers, and the per-row completion loss.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from datasets import Dataset

from .data import iter_batches, tokenize_rows
from .metrics import load_exact_match
from .record.per_sample_loss import forward_at_labels, row_losses


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
        outputs, kept = forward_at_labels(model, batch, labels)
        out[positions] = row_losses(outputs.logits, labels, kept)[0].cpu().numpy()
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, dataset: Dataset, batch_size: int = 64) -> list[str]:
    """Greedy decoding after each row's `prompt`, up to EOS or one token more than its `completion` needs."""
    model.eval()
    prompts, answers = list(dataset["prompt"]), list(dataset["completion"])
    out: list[str] = []
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
        for row in generated.tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def evaluate_by_task(model, tokenizer, dataset: Dataset) -> dict[str, dict[str, float]]:
    """{task: {"loss": mean loss, "exact_match": mean exact match, "rows": n}} plus an "all" entry."""
    losses = per_row_loss(model, tokenizer, dataset)
    tasks = [str(t) for t in dataset["task"]]
    scores = load_exact_match().compute(
        predictions=generate_answers(model, tokenizer, dataset), references=list(dataset["completion"]), groups=tasks
    )
    groups = defaultdict(list)
    for i, task in enumerate(tasks):
        groups[task].append(i)
    by_task = scores["exact_match_by_group"]
    out = {
        task: {"loss": float(np.mean(losses[idx])), "exact_match": by_task[task], "rows": len(idx)}
        for task, idx in groups.items()
    }
    out["all"] = {"loss": float(np.mean(losses)), "exact_match": scores["exact_match"], "rows": len(tasks)}
    return out
