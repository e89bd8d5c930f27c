"""Tokenize raw rows the way SFTTrainer does, for passes hf_datasel runs itself.

Featurizing, spectra and probes run their own forward passes on datasets the trainer never
saw (targets, probes, evaluation rows). They tokenize like TRL's SFTTrainer: prompt tokens,
then completion tokens and EOS, with the loss on the completion only; a `text` row is
trained on every token. Padding may be on either side; the loss never depends on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from datasets import Dataset

from .record.per_sample_loss import IGNORE_INDEX


def _columns_error(columns: list[str]) -> ValueError:
    return ValueError(f"Expected a 'prompt' and 'completion' column (or a 'text' column); the dataset has {columns}.")


def tokenize_rows(dataset: Dataset, tokenizer, max_length: int | None = 1024) -> list[dict[str, list[int]]]:
    """Per row: `input_ids` and `labels` (-100 on the prompt), truncated to `max_length`."""
    columns = dataset.column_names
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    if {"prompt", "completion"} <= set(columns):
        prompts, completions = list(dataset["prompt"]), list(dataset["completion"])
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer([p + c for p, c in zip(prompts, completions)], add_special_tokens=False)["input_ids"]
        rows = []
        for prompt, full in zip(prompt_ids, full_ids):
            ids = full + [tokenizer.eos_token_id]
            rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]})
    elif "text" in columns:
        texts = tokenizer(list(dataset["text"]), add_special_tokens=False)["input_ids"]
        rows = [{"input_ids": t + [tokenizer.eos_token_id], "labels": t + [tokenizer.eos_token_id]} for t in texts]
    else:
        raise _columns_error(columns)
    if max_length is not None:
        rows = [{k: v[:max_length] for k, v in row.items()} for row in rows]
    return rows


def pad_batch(
    rows: list[dict[str, list[int]]], pad_token_id: int, padding_side: Literal["left", "right"] = "right"
) -> dict[str, torch.Tensor]:
    """Pad `input_ids`/`labels` into tensors with an `attention_mask`."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        n, pad = len(r["input_ids"]), width - len(r["input_ids"])
        fill = {"input_ids": [pad_token_id] * pad, "attention_mask": [0] * pad, "labels": [IGNORE_INDEX] * pad}
        real = {"input_ids": r["input_ids"], "attention_mask": [1] * n, "labels": r["labels"]}
        for k in out:
            out[k].append(fill[k] + real[k] if padding_side == "left" else real[k] + fill[k])
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def iter_batches(
    rows: list[dict[str, list[int]]],
    batch_size: int,
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
    sort_by_length: bool = True,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield (row positions, padded batch); length-sorted batches waste less compute on padding."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"])) if sort_by_length else range(len(rows))
    order = list(order)
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        yield positions, pad_batch([rows[i] for i in positions], pad_token_id, padding_side)
