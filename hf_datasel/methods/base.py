"""What every selection method receives and returns, and the check of the parameters it is called with."""

from __future__ import annotations

import collections.abc
import inspect
import numbers
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

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
    warnings: list[str] = field(default_factory=list)  # what a user of the subset should know (also on its card)

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
    unrecorded: np.ndarray | None = None  # bool per row: records that must not be used (the row changed since)

    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    def recorded_mask(self, method: str) -> np.ndarray:
        """Bool per raw row: the run trained on it and its record may be used."""
        row_id = self.require_store(method).load_arrays(RunStore.ROWS)["row_id"]
        mask = np.zeros(self.num_rows, bool)
        mask[row_id[row_id < self.num_rows]] = True
        if self.unrecorded is not None:
            mask &= ~self.unrecorded
        return mask

    def require_store(self, method: str) -> RunStore:
        if self.store is None:
            raise StoreError(f"method {method!r} needs a recorded run; build the selector with DataSelector.from_run.")
        return self.store

    def aligned(self, row_id: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Scatter per-row values into an array over all raw rows (NaN where not recorded)."""
        shape = (self.num_rows, *values.shape[1:])
        out = np.full(shape, np.nan, np.float64)
        inside = row_id < self.num_rows  # rows recorded past the end of a shorter dataset (allowed explicitly)
        out[row_id[inside]] = values[inside]
        if self.unrecorded is not None:
            out[self.unrecorded] = np.nan
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


# -- parameters ---------------------------------------------------------------------------
def function_name(fn: Callable | None) -> str | None:
    """How a function passed to a method is named in its parameters (and the card): module and qualified name."""
    return None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def method_parameters(fn: Callable[..., Selection]) -> dict[str, inspect.Parameter]:
    """The parameters a method takes after its `ctx`, by name."""
    return dict(list(inspect.signature(fn).parameters.items())[1:])


def required_parameters(fn: Callable[..., Selection]) -> list[str]:
    """The parameters a method cannot run without (no default)."""
    return [n for n, p in method_parameters(fn).items() if p.default is inspect.Parameter.empty]


def check_params(method: str, fn: Callable[..., Selection], params: dict[str, Any]) -> None:
    """Raise one clear error, naming the parameter, when `params` do not fit the method's signature.

    Unknown and missing parameters are reported first; then every value whose type hint is
    plain (int, float, str, bool, None, Literal, lists, and unions of these) is checked, so a
    value like `num_clusters="abc"` from the command line fails here and not deep in the method.
    """
    accepted = method_parameters(fn)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"method {method!r} takes no parameter(s) {unknown}; it takes {list(accepted)}.")
    missing = [n for n in required_parameters(fn) if n not in params]
    if missing:
        raise ValueError(f"method {method!r} needs the parameter(s) {missing}.")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve here: leave the values to the method
        return
    for name, value in params.items():
        hint = hints.get(name, Any)
        if not _fits(value, hint):
            raise ValueError(f"method {method!r}: parameter {name} must be {_describe(hint)}, not {value!r}.")


_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Collection)


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` fits a plain type hint; hints that are not plain accept anything."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if (origin or hint) in _SEQUENCES:
        return isinstance(value, (list, tuple, range, np.ndarray)) or (
            not isinstance(value, str) and isinstance(value, collections.abc.Collection)
        )
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is None or hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(option) for option in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    if hint in names:
        return names[hint]
    if (origin or hint) in _SEQUENCES:
        return "a list"
    return f"a {getattr(hint, '__name__', hint)}"
