"""Step 4 of the flow: `DataSelector` turns a recorded run into subsets of the user's raw rows."""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset

from .methods import Selection, SelectionContext, get_method
from .methods.base import check_params
from .rows import ROW_ID, row_hashes, strip_row_columns
from .store import ROWS_KEYS, RunStore, StoreError

logger = logging.getLogger(__name__)

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


BUDGET_HELP = (
    "a fraction of the dataset, a float in (0, 1] (0.2 is a fifth, 1.0 the whole dataset), "
    "or a number of rows, a whole number >= 1 (500)"
)


def resolve_budget(budget: float | int, num_rows: int) -> int:
    """The budget as a row count: a float in (0, 1] is a fraction of `num_rows`, an int >= 1 a row count.

    The type decides, never the value: `1.0` is the whole dataset and `1` one row, here and on the
    command line (`parse_budget`). A float above 1 is an error rather than a guess.
    """
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be {BUDGET_HELP}; not {budget!r}")
    if isinstance(budget, numbers.Integral):
        if not 1 <= budget <= num_rows:
            raise ValueError(f"budget of {budget} rows is out of range: the dataset has {num_rows} rows.")
        return int(budget)
    if not (np.isfinite(budget) and 0 < budget <= 1):
        hint = f" (for {int(budget)} rows, give the whole number {int(budget)})" if float(budget).is_integer() else ""
        raise ValueError(f"budget {budget} is out of range: give {BUDGET_HELP}{hint}.")
    return max(1, int(round(budget * num_rows)))


def parse_budget(text: str) -> float | int:
    """A budget written as text (command line, recipes): `"500"` is 500 rows; `"0.2"` and `"1.0"` are fractions."""
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--budget must be {BUDGET_HELP}; not {text!r}") from None


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
        self.unrecorded: np.ndarray | None = None
        self.history: list[SelectionRecord] = []

    @classmethod
    def from_run(
        cls, output_dir: str | os.PathLike, dataset: Dataset, *, allow_unrecorded_rows: bool = False
    ) -> DataSelector:
        """Open the store under `output_dir` and check it was recorded on exactly `dataset`.

        A dataset that differs from the recorded one in any way (a changed, swapped or removed
        row, or rows appended after recording) is refused with a `StoreError`. With
        `allow_unrecorded_rows=True` it is used anyway: the rows that differ, and rows past the
        recorded ones, count as never recorded (no loss, like rows SFTTrainer dropped), and a
        warning says how many there are.
        """
        store = RunStore.for_output_dir(output_dir)
        manifest = store.manifest  # raises a clear error when there is no store
        selector = cls(dataset, store)
        selector.unrecorded = selector._check_rows_match(dataset, manifest, allow_unrecorded_rows)
        return selector

    def _check_rows_match(self, dataset: Dataset, manifest: dict[str, Any], allow: bool) -> np.ndarray | None:
        """The rows whose records must not be used (None: every record fits), or a `StoreError`."""
        if not self.store.has(RunStore.ROWS):
            return None  # snapshots only: nothing per row was recorded, so nothing can be misaligned
        rows = self.store.load_arrays(RunStore.ROWS, ROWS_KEYS)
        row_id, recorded_hash = rows["row_id"], rows["row_hash"]
        if ROW_ID in dataset.column_names and not np.array_equal(
            np.asarray(dataset[ROW_ID], np.int64), np.arange(len(dataset))
        ):
            raise StoreError(
                "The dataset's datasel_row_id column is not 0..n-1: pass the dataset in its original order."
            )
        n = len(dataset)
        # the raw row count when the recorder knew it, else what the records prove (SFTTrainer may drop rows)
        recorded_rows = manifest.get("dataset", {}).get("num_rows") or (int(row_id.max()) + 1 if len(row_id) else 0)
        inside = row_id < n
        mismatched = row_id[inside][row_hashes(dataset)[row_id[inside]] != recorded_hash[inside]]
        problems = []
        if not inside.all():
            problems.append(
                f"it was recorded on at least {int(row_id.max()) + 1} rows and this dataset has {n} (rows removed?)"
            )
        if len(mismatched):
            problems.append(
                f"{len(mismatched)} of {len(row_id)} recorded rows have different content "
                f"(first rows: {mismatched[:5].tolist()})"
            )
        if n > recorded_rows:
            extra = f"row {recorded_rows} was" if n == recorded_rows + 1 else f"rows {recorded_rows}..{n - 1} were"
            problems.append(
                f"this dataset has {n} rows and the run recorded {recorded_rows}: {extra} never recorded "
                "(appended after recording?)"
            )
        if not problems:
            return None
        what = f"The store at {self.store.path} does not match this dataset: " + "; ".join(problems)
        if not allow:
            raise StoreError(
                f"{what}. Pass the same raw dataset, in the same order, that the recording run trained on, or "
                "allow_unrecorded_rows=True (command line: --allow-unrecorded-rows) to treat those rows as never "
                "recorded."
            )
        unrecorded = np.zeros(n, bool)
        unrecorded[mismatched] = True
        unrecorded[recorded_rows:] = True
        logger.warning("%s; %d row(s) count as never recorded (allow_unrecorded_rows=True)", what, unrecorded.sum())
        return unrecorded

    def select(
        self,
        method: str,
        budget: float | int,
        *,
        with_scores: bool = False,
        seed: int = 0,
        **params: Any,
    ) -> Dataset:
        """Rows chosen by `method` within `budget`: a float in (0, 1] is a fraction, an int >= 1 a row count.

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
        check_params(method, fn, params)
        count = resolve_budget(budget, len(self.dataset))
        ctx = SelectionContext(
            store=self.store, dataset=self.dataset, budget=count, seed=seed, unrecorded=self.unrecorded
        )
        selection = fn(ctx, **params)
        if len(selection.indices) > count:
            raise AssertionError(f"method {method!r} returned {len(selection.indices)} rows for a budget of {count}")
        if self.unrecorded is not None and self.unrecorded.any():
            selection.warnings.append(
                f"{int(self.unrecorded.sum())} of the dataset's {len(self.dataset)} rows did not match the recording "
                "run's rows and counted as never recorded (allow_unrecorded_rows=True)"
            )
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
