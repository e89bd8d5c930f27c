"""Baseline: a uniform random subset, seeded."""

from __future__ import annotations

import numpy as np

from .base import Selection, SelectionContext


def select_random(ctx: SelectionContext) -> Selection:
    """`budget` rows drawn uniformly without replacement from the whole dataset."""
    rng = np.random.default_rng(ctx.seed)
    indices = rng.choice(ctx.num_rows, size=ctx.budget, replace=False)
    return Selection(indices=indices, method="random", params={"seed": ctx.seed})
