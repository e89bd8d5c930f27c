"""Step 4 of the flow: `DataSelector` turns a recorded run into subsets of the user's raw rows."""

from __future__ import annotations

import inspect
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset

from .methods import Selection, SelectionContext, get_method
from .rows import ROW_ID, row_hashes, strip_row_columns
from .store import RunStore, StoreError

SCORE_COLUMN = "datasel_score"


@dataclass
class SelectionRecord:
    """What one `select` call did: enough to describe the subset on a dataset card."""

    selection: Selection
    budget: int
    budget_requested: float | int
    source_num_rows: int
    source_fingerprint: str
    store_manifest: dict[str, Any] | None


def resolve_budget(budget: float | int, num_rows: int) -> int:
    """A fraction in (0, 1] of `num_rows`, or a row count in [1, num_rows], as a row count."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a fraction in (0, 1] or a row count, not {budget!r}")
    if isinstance(budget, numbers.Integral):
        if not 1 <= budget <= num_rows:
            raise ValueError(f"budget of {budget} rows is out of range: the dataset has {num_rows} rows.")
        return int(budget)
    if not (np.isfinite(budget) and 0 < budget <= 1):
        raise ValueError(f"budget {budget} is out of range: give a fraction in (0, 1] or a whole row count.")
    return max(1, int(round(budget * num_rows)))


class DataSelector:
    """Select subsets of a raw dataset from what a recorded run learned about its rows.

    >>> selector = DataSelector.from_run("runs/proxy", dataset=raw_ds)
    >>> subset = selector.select("s2l", budget=0.2)   # raw rows, original order and columns
    """

    def __init__(self, dataset: Dataset, store: RunStore | None = None):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset, not {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("The dataset is empty; there is nothing to select from.")
        self.dataset = strip_row_columns(dataset)
        self.store = store
        self.history: list[SelectionRecord] = []

    @classmethod
    def from_run(cls, output_dir: str | os.PathLike, dataset: Dataset) -> DataSelector:
        """Open the store under `output_dir` and check it was recorded on `dataset`."""
        store = RunStore.for_output_dir(output_dir)
        store.manifest  # noqa: B018 - raises a clear error when there is no store
        selector = cls(dataset, store)
        selector._check_rows_match(dataset)
        return selector

    def _check_rows_match(self, dataset: Dataset) -> None:
        if not self.store.has(RunStore.ROWS):
            return  # snapshots only: nothing per row was recorded, so nothing can be misaligned
        rows = self.store.load_arrays(RunStore.ROWS)
        row_id, recorded_hash = rows["row_id"], rows["row_hash"]
        if ROW_ID in dataset.column_names and not np.array_equal(
            np.asarray(dataset[ROW_ID], np.int64), np.arange(len(dataset))
        ):
            raise StoreError(
                "The dataset's datasel_row_id column is not 0..n-1: pass the dataset in its original order."
            )
        if len(row_id) and row_id.max() >= len(dataset):
            raise StoreError(
                f"The store at {self.store.path} was recorded on a dataset with at least {row_id.max() + 1} rows; "
                f"this dataset has {len(dataset)}. Pass the same raw dataset the run trained on."
            )
        mismatched = np.flatnonzero(row_hashes(dataset)[row_id] != recorded_hash)
        if len(mismatched):
            first = row_id[mismatched[:5]].tolist()
            raise StoreError(
                f"The store at {self.store.path} does not match this dataset: {len(mismatched)} of {len(row_id)} "
                f"recorded rows have different content (first rows: {first}). Pass the same raw dataset, "
                "in the same order, that the recording run trained on."
            )

    def select(
        self,
        method: str,
        budget: float | int,
        *,
        with_scores: bool = False,
        seed: int = 0,
        **params: Any,
    ) -> Dataset:
        """Rows chosen by `method` within `budget` (a fraction of the dataset or a row count).

        Returns the raw rows in their original order with their original columns, plus a
        `datasel_score` column when `with_scores=True`. The call is recorded in `history`.
        """
        selection = self.run(method, budget, seed=seed, **params)
        subset = self.dataset.select(selection.indices)
        if with_scores:
            if selection.scores is None:
                raise ValueError(f"method {method!r} gives no per-row scores; call select without with_scores.")
            subset = subset.add_column(SCORE_COLUMN, selection.scores.tolist())
        return subset

    def run(self, method: str, budget: float | int, *, seed: int = 0, **params: Any) -> Selection:
        """Like `select`, but return the `Selection` (indices, scores, parameters, method info)."""
        fn = get_method(method)
        accepted = list(inspect.signature(fn).parameters)[1:]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise TypeError(f"method {method!r} takes no parameter(s) {unknown}; it takes {accepted}.")
        count = resolve_budget(budget, len(self.dataset))
        ctx = SelectionContext(store=self.store, dataset=self.dataset, budget=count, seed=seed)
        selection = fn(ctx, **params)
        if len(selection.indices) > count:
            raise AssertionError(f"method {method!r} returned {len(selection.indices)} rows for a budget of {count}")
        self.history.append(
            SelectionRecord(
                selection=selection,
                budget=count,
                budget_requested=budget,
                source_num_rows=len(self.dataset),
                source_fingerprint=self.dataset._fingerprint,
                store_manifest=self.store.manifest if self.store is not None else None,
            )
        )
        return selection

    @property
    def last(self) -> SelectionRecord:
        if not self.history:
            raise ValueError("No selection has been made yet.")
        return self.history[-1]

    # -- sharing (implemented in hub.py) ------------------------------------------------
    def save_selection(
        self,
        subset: Dataset,
        directory: str | os.PathLike,
        *,
        record: SelectionRecord | None = None,
        source_dataset: str | None = None,
    ) -> os.PathLike:
        """Write `subset` as `data/train-*.parquet` plus a dataset card `README.md` (readable by `load_dataset`)."""
        from .hub import find_record, save_selection

        return save_selection(subset, directory, record or find_record(self, subset), source_dataset)

    def push_to_hub(
        self,
        subset: Dataset,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        record: SelectionRecord | None = None,
        source_dataset: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Push `subset` and a dataset card saying how it was chosen to the dataset repo `repo_id`."""
        from .hub import find_record, push_selection

        return push_selection(
            subset,
            repo_id,
            record or find_record(self, subset),
            private=private,
            token=token,
            commit_message=commit_message,
            source_dataset=source_dataset,
        )
