"""Baseline: rank rows by their final recorded loss."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .base import Selection, SelectionContext


def select_by_loss(ctx: SelectionContext, which: Literal["highest", "lowest", "middle"] = "highest") -> Selection:
    """The `budget` rows with the highest, lowest, or most central final loss.

    Rows without a finite loss (never trained on, or NaN) are left out and counted in `info`.
    """
    if which not in ("highest", "lowest", "middle"):
        raise ValueError(f"loss: which must be 'highest', 'lowest' or 'middle', not {which!r}")
    losses = ctx.final_losses("loss")
    finite = np.flatnonzero(np.isfinite(losses))
    ctx.check_budget(len(finite), "loss", "rows with a finite recorded loss")
    order = finite[np.argsort(losses[finite], kind="stable")]  # ascending, ties by row
    if which == "lowest":
        chosen = order[: ctx.budget]
    elif which == "highest":
        chosen = order[::-1][: ctx.budget]
    else:
        start = (len(order) - ctx.budget) // 2
        chosen = order[start : start + ctx.budget]
    return Selection(
        indices=chosen,
        scores=losses[chosen],
        method="loss",
        params={"which": which},
        info={"rows_without_finite_loss": int(ctx.num_rows - len(finite))},
    )
