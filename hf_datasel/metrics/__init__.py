"""`evaluate` metric modules that ship with hf_datasel: `evaluate.load(EXACT_MATCH)` works offline."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

EXACT_MATCH = str(Path(__file__).parent / "exact_match")
"""Folder of the exact-match metric (overall and per group), for `evaluate.load`."""


SELECTION_STATS = str(Path(__file__).parent / "selection_stats")
"""Folder of the selection-statistics metric (rows per source, target share, flagged shares), for `evaluate.load`."""


def load_exact_match():
    """`evaluate.load(EXACT_MATCH)`: the metric module, loaded from the installed package."""
    import evaluate

    return evaluate.load(EXACT_MATCH)


@functools.lru_cache(maxsize=1)
def load_selection_stats():
    """`evaluate.load(SELECTION_STATS)`: the metric module, loaded once from the installed package."""
    import evaluate

    return evaluate.load(SELECTION_STATS)


def selection_stats(
    pool, indices: Sequence[int], source: str = "task", target: str | None = None, flags: dict[str, str] | None = None
) -> dict:
    """The metric on a `datasets.Dataset` pool and a selection's row indices.

    `flags` maps a name to a boolean column of the pool (e.g. `{"noisy": "is_noisy"}`).
    """
    chosen = set(int(i) for i in indices)
    if len(chosen) != len(indices):
        raise ValueError("indices repeat a row")
    if chosen and (min(chosen) < 0 or max(chosen) >= len(pool)):
        raise ValueError(f"indices must be rows of the pool (0..{len(pool) - 1})")
    selected = [i in chosen for i in range(len(pool))]
    columns = {name: list(pool[column]) for name, column in (flags or {}).items()}
    return load_selection_stats().compute(
        selected=selected, source=list(pool[source]), target=target, flags=columns or None
    )


__all__ = ["EXACT_MATCH", "SELECTION_STATS", "load_exact_match", "load_selection_stats", "selection_stats"]
