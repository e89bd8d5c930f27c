"""Spectral: rank rows by a layer-wise gradient spectrum metric (nuclear norm, effective rank, ...).

Li et al., 2025 (arXiv 2504.10766): higher-quality instruction and reasoning data tend to give
gradients with lower nuclear norms and higher effective ranks. Spectra come from
`hf_datasel.gradient_spectra`: passed in, cached in the run store, or computed here on the fly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..store import StoreError
from .base import Selection, SelectionContext


def _spectra_for(ctx: SelectionContext, spectra, name: str, model, tokenizer, batch_size: int, max_length):
    from ..spectra import GradientSpectra, gradient_spectra

    if spectra is not None:
        if not isinstance(spectra, GradientSpectra):
            raise TypeError(f"spectral: spectra must be a GradientSpectra, not {type(spectra).__name__}")
        spectra.check_rows(ctx.dataset, where="the spectra passed in")
        return spectra, "argument"
    if model is not None:
        if tokenizer is None:
            raise ValueError("spectral: computing spectra on the fly needs tokenizer= next to model=")
        # with the run's store: rows made as the recorded trainer made them (and the spectra kept there)
        return gradient_spectra(
            model, ctx.dataset, tokenizer, batch_size=batch_size, max_length=max_length, store=ctx.store, name=name
        ), "computed"
    if ctx.store is not None and ctx.store.has(name):
        return GradientSpectra.load(ctx.store, dataset=ctx.dataset, name=name), "store"
    where = f"the store at {ctx.store.path} has no '{name}' record" if ctx.store is not None else "there is no store"
    raise StoreError(
        f"method 'spectral' needs gradient spectra, but {where}. Run "
        "gradient_spectra(model, dataset, tokenizer=tok, store=output_dir) first, or pass spectra=..., "
        "or model= and tokenizer= to compute them now."
    )


def select_spectral(
    ctx: SelectionContext,
    metric: str = "effective_rank",
    direction: Literal["highest", "lowest"] | None = None,
    layers: Literal["all"] | int | Sequence[int] | None = None,
    projections: Sequence[str] | None = None,
    spectra=None,
    name: str = "spectra",
    model=None,
    tokenizer=None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> Selection:
    """The `budget` rows with the highest or lowest `metric`, averaged over the chosen layers/projections.

    `direction=None` takes the end the paper links to quality (highest effective rank, lowest
    norms). Rows whose summary is NaN (no response tokens, zero gradient) are left out and counted.
    """
    from ..spectra import METRICS, QUALITY_DIRECTION

    if metric not in METRICS:
        raise ValueError(f"spectral: unknown metric {metric!r}; choose from {METRICS}")
    direction = direction or QUALITY_DIRECTION[metric]
    if direction not in ("highest", "lowest"):
        raise ValueError(f"spectral: direction must be 'highest' or 'lowest', not {direction!r}")
    found, source = _spectra_for(ctx, spectra, name, model, tokenizer, batch_size, max_length)
    scores = found.summary(metric, layers=layers, projections=projections)
    finite = np.flatnonzero(np.isfinite(scores))
    ctx.check_budget(len(finite), "spectral", f"rows with a finite {metric}")
    key = scores[finite] if direction == "lowest" else -scores[finite]
    order = finite[np.argsort(key, kind="stable")]  # ties by row position
    chosen = order[: ctx.budget]
    return Selection(
        indices=chosen,
        scores=scores[chosen],
        method="spectral",
        params={
            "metric": metric,
            "direction": direction,
            "layers": layers,
            "projections": None if projections is None else list(projections),
            "name": name,
        },
        info={
            "source": source,
            "rows_without_finite_score": int(ctx.num_rows - len(finite)),
            "matrices": [t.qualified_name for t in found.targets],
            "spectra_info": found.info,
        },
    )
