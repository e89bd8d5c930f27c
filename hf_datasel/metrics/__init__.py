"""`evaluate` metric modules that ship with hf_datasel: `evaluate.load(EXACT_MATCH)` works offline."""

from __future__ import annotations

from pathlib import Path

EXACT_MATCH = str(Path(__file__).parent / "exact_match")
"""Folder of the exact-match metric (overall and per group), for `evaluate.load`."""


def load_exact_match():
    """`evaluate.load(EXACT_MATCH)`: the metric module, loaded from the installed package."""
    import evaluate

    return evaluate.load(EXACT_MATCH)


__all__ = ["EXACT_MATCH", "load_exact_match"]
