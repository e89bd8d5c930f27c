"""What every selection method receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset

from ..store import RunStore, StoreError


@dataclass
class Selection:
    """Rows chosen by a method: positions in the raw dataset, ascending, with a score each where the method has one."""

    indices: np.ndarray
    method: str
    params: dict[str, Any]
    scores: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        order = np.argsort(self.indices, kind="stable")
        self.indices = np.asarray(self.indices, np.int64)[order]
        if self.scores is not None:
            self.scores = np.asarray(self.scores, np.float64)[order]
        if len(np.unique(self.indices)) != len(self.indices):
            raise AssertionError(f"method {self.method!r} selected a row twice")


@dataclass
class SelectionContext:
    """The inputs a method may use: the run store, the raw dataset, the budget as a row count, a seed."""

    store: RunStore | None
    dataset: Dataset
    budget: int
    seed: int = 0

    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    def require_store(self, method: str) -> RunStore:
        if self.store is None:
            raise StoreError(f"method {method!r} needs a recorded run; build the selector with DataSelector.from_run.")
        return self.store

    def aligned(self, row_id: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Scatter per-row values into an array over all raw rows (NaN where not recorded)."""
        shape = (self.num_rows, *values.shape[1:])
        out = np.full(shape, np.nan, np.float64)
        out[row_id] = values
        return out

    def final_losses(self, method: str) -> np.ndarray:
        """Each raw row's latest recorded loss (NaN for rows the trainer never trained on)."""
        return self.aligned(*self.require_store(method).final_losses())

    def trajectories(self, method: str) -> tuple[np.ndarray, str]:
        """Loss trajectories over all raw rows, shape (rows, T), and where they came from."""
        row_id, traj, source = self.require_store(method).trajectories()
        if traj.shape[1] == 0:
            raise StoreError(f"method {method!r} needs loss trajectories, but the store has no loss records.")
        return self.aligned(row_id, traj), source

    def check_budget(self, available: int, method: str, why: str) -> None:
        if self.budget > available:
            raise ValueError(
                f"budget of {self.budget} rows is more than the {available} rows {method!r} can choose from ({why})."
            )
