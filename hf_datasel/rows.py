"""Row identity: tie every recorded number to one row of the user's raw dataset.

SFTTrainer tokenizes, truncates and *drops* rows, and samplers shuffle them, so positions
after preparation are not positions in the raw data. `with_row_ids` stamps each raw row
with its position and a content hash before the trainer sees it; both columns survive
tokenization and filtering, and the hash later proves that a store and a dataset match.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from datasets import Dataset

ROW_ID = "datasel_row_id"
ROW_HASH = "datasel_row_hash"
ROW_COUNT = "datasel_num_rows"  # the raw dataset's size, on every row: SFTTrainer may drop the last rows
ROW_COLUMNS = (ROW_ID, ROW_HASH, ROW_COUNT)


def _row_hash(row: dict) -> int:
    payload = json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little", signed=True)


def _hash_batch(batch: dict[str, list]) -> dict[str, list[int]]:
    columns = [c for c in batch if c not in ROW_COLUMNS]
    n = len(next(iter(batch.values()))) if batch else 0
    return {ROW_HASH: [_row_hash({c: batch[c][i] for c in columns}) for i in range(n)]}


def row_hashes(dataset: Dataset) -> np.ndarray:
    """A 64-bit content hash per row (datasel columns left out), in row order."""
    if len(dataset) == 0:
        return np.zeros(0, dtype=np.int64)
    content = dataset.with_format(None).remove_columns([c for c in ROW_COLUMNS if c in dataset.column_names])
    hashes = [h for batch in content.iter(batch_size=1024) for h in _hash_batch(batch)[ROW_HASH]]  # no table written
    return np.asarray(hashes, dtype=np.int64)


def with_row_ids(dataset: Dataset) -> Dataset:
    """Return `dataset` with `datasel_row_id` (its position), `datasel_row_hash` and `datasel_num_rows` columns.

    Pass the result to the trainer that runs the recording callbacks. Calling it on a
    dataset that already has the columns re-stamps them, so it is safe to call twice.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"with_row_ids expects a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("with_row_ids: the dataset is empty; there is nothing to record or select.")
    hashes = row_hashes(dataset)
    plain = strip_row_columns(dataset)
    stamped = plain.add_column(ROW_ID, np.arange(len(dataset), dtype=np.int64)).add_column(ROW_HASH, hashes)
    return stamped.add_column(ROW_COUNT, np.full(len(dataset), len(dataset), dtype=np.int64))


def strip_row_columns(dataset: Dataset) -> Dataset:
    """The user's own columns only."""
    present = [c for c in ROW_COLUMNS if c in dataset.column_names]
    return dataset.remove_columns(present) if present else dataset
