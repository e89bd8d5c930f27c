"""S2L (SmallToLarge): cluster loss trajectories, then sample the clusters evenly.

Yang et al., 2024 (arXiv 2403.07384). Rows whose losses moved alike while a small model
trained tend to have alike gradients, so an even draw over trajectory clusters keeps what
the whole pool teaches while dropping its redundancy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.cluster import KMeans

from .base import Selection, SelectionContext


def balanced_sample(labels: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Positions into `labels`: clusters visited from smallest to largest (ties by label), each given
    `(budget - selected) // clusters_left`; a cluster that fits its quota is taken whole,
    otherwise its quota is drawn uniformly without replacement."""
    clusters, sizes = np.unique(labels, return_counts=True)
    visit = clusters[np.lexsort((clusters, sizes))]
    chosen: list[np.ndarray] = []
    taken = 0
    for j, cluster in enumerate(visit):
        quota = (budget - taken) // (len(visit) - j)
        members = np.flatnonzero(labels == cluster)
        pick = members if len(members) <= quota else rng.choice(members, size=quota, replace=False)
        chosen.append(pick)
        taken += len(pick)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def cluster_trajectories(trajectories: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """k-means labels (Euclidean) with `num_clusters` clamped to the number of distinct trajectories."""
    distinct = len(np.unique(trajectories, axis=0))
    k = max(1, min(num_clusters, distinct))
    if k == 1:
        return np.zeros(len(trajectories), np.int64)
    kmeans = KMeans(n_clusters=k, n_init=3, random_state=seed)
    return kmeans.fit_predict(trajectories.astype(np.float64))


def _largest_remainder(sizes: np.ndarray, budget: int) -> np.ndarray:
    exact = sizes / sizes.sum() * budget
    alloc = np.floor(exact).astype(np.int64)
    remainder = budget - alloc.sum()
    alloc[np.argsort(-(exact - alloc), kind="stable")[:remainder]] += 1
    return np.minimum(alloc, sizes)


def select_s2l(
    ctx: SelectionContext,
    num_clusters: int = 100,
    stratify_by: str | None = None,
    nan_policy: Literal["drop", "raise"] = "drop",
) -> Selection:
    """Balanced sampling over k-means clusters of loss trajectories.

    Args:
        num_clusters: K, clamped to the number of distinct trajectories.
        stratify_by: a column of the dataset (e.g. a `source`); the budget is split across
            its values in proportion to their sizes and S2L runs within each.
        nan_policy: rows with a non-finite loss anywhere in their trajectory are left out
            and counted (`"drop"`), or make the call fail (`"raise"`). Never imputed.
    """
    if num_clusters < 1:
        raise ValueError("s2l: num_clusters must be at least 1")
    if nan_policy not in ("drop", "raise"):
        raise ValueError(f"s2l: nan_policy must be 'drop' or 'raise', not {nan_policy!r}")
    trajectories, source = ctx.trajectories("s2l")
    store_rows = ctx.require_store("s2l").load_arrays("rows")["row_id"]
    recorded = np.zeros(ctx.num_rows, bool)
    recorded[store_rows] = True
    finite = np.isfinite(trajectories).all(axis=1)
    nonfinite_recorded = np.flatnonzero(recorded & ~finite)
    if nan_policy == "raise" and len(nonfinite_recorded):
        raise ValueError(
            f"s2l: {len(nonfinite_recorded)} trained rows have non-finite losses in their trajectory "
            f"(first rows: {nonfinite_recorded[:5].tolist()}); use nan_policy='drop' to leave them out."
        )
    candidates = np.flatnonzero(finite)
    ctx.check_budget(len(candidates), "s2l", "rows with a complete, finite loss trajectory")
    rng = np.random.default_rng(ctx.seed)

    if stratify_by is None:
        groups = {None: candidates}
    else:
        if stratify_by not in ctx.dataset.column_names:
            raise ValueError(f"s2l: stratify_by={stratify_by!r} is not a column; columns: {ctx.dataset.column_names}")
        values = np.asarray(ctx.dataset[stratify_by], dtype=object)[candidates]
        groups = {v: candidates[values == v] for v in sorted(set(values.tolist()), key=str)}
    quotas = _largest_remainder(np.array([len(g) for g in groups.values()]), ctx.budget)

    chosen, clusters_used = [], {}
    for (name, members), quota in zip(groups.items(), quotas):
        labels = cluster_trajectories(trajectories[members], num_clusters, ctx.seed)
        chosen.append(members[balanced_sample(labels, int(quota), rng)])
        clusters_used[str(name)] = int(labels.max()) + 1
    return Selection(
        indices=np.concatenate(chosen),
        method="s2l",
        params={"num_clusters": num_clusters, "stratify_by": stratify_by, "nan_policy": nan_policy, "seed": ctx.seed},
        info={
            "trajectory_source": source,
            "trajectory_length": int(trajectories.shape[1]),
            "clusters": clusters_used if stratify_by else clusters_used["None"],
            "rows_not_recorded": int((~recorded).sum()),
            "rows_with_nonfinite_loss": int(len(nonfinite_recorded)),
        },
    )
