"""S2L (SmallToLarge): cluster loss trajectories, then sample the clusters evenly.

Yang et al., 2024 (arXiv 2403.07384). Rows whose losses moved alike while a small model
trained tend to have alike gradients, so an even draw over trajectory clusters keeps what
the whole pool teaches while dropping its redundancy.

By default this follows the authors' code (`schedules/s2l.py`), not only the paper's text:

* clusters of at most `tiny_cluster` (2) rows are left out of the balanced pass and only
  fill what the pass leaves of the budget. k-means isolates far-away trajectories (often
  noisy or broken rows) in exactly such clusters; a balanced pass that takes small clusters
  whole would take every one of them.
* with `stratify_by`, every source gets an equal share of the budget, visited smallest first
  (a source smaller than its share is taken whole and the rest passes on), as the reference
  does; `stratify_split="proportional"` splits in proportion to source sizes instead.

Where it still differs from the reference, and the parameter that gives the reference's
behaviour: k-means is scikit-learn's k-means++ with 3 restarts (`kmeans_init="random"`:
random initial centroids, one run, 20 iterations, as `faiss.Kmeans` does by default);
rows with a NaN loss are left out (`nan_policy="zero"`: set to 0, as the reference does);
sampling is seeded (the reference draws from numpy's global generator).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.cluster import KMeans

from .base import Selection, SelectionContext

TINY_CLUSTER = 2
"""The reference's threshold: clusters of at most this many rows only fill a remainder."""


def balanced_sample(
    labels: np.ndarray, budget: int, rng: np.random.Generator, tiny_cluster: int = TINY_CLUSTER
) -> np.ndarray:
    """Positions into `labels`, sorted: S2L's balanced pass over clusters, then a remainder fill.

    Clusters of more than `tiny_cluster` rows are visited from smallest to largest (ties by
    label), each given `(budget - selected) // clusters_left`; a cluster that fits its quota is
    taken whole, otherwise its quota is drawn uniformly without replacement. Whatever budget is
    left is drawn uniformly from the rows of the tiny clusters (then, should those run out, from
    the rows not yet chosen). `tiny_cluster=0` puts every cluster in the balanced pass.
    """
    clusters, sizes = np.unique(labels, return_counts=True)
    big = sizes > tiny_cluster
    visit = clusters[big][np.lexsort((clusters[big], sizes[big]))]
    chosen: list[np.ndarray] = []
    taken = 0
    for j, cluster in enumerate(visit):
        quota = (budget - taken) // (len(visit) - j)
        members = np.flatnonzero(labels == cluster)
        pick = members if len(members) <= quota else rng.choice(members, size=quota, replace=False)
        chosen.append(pick)
        taken += len(pick)
    if taken < budget:
        picked = np.zeros(len(labels), bool)
        picked[np.concatenate(chosen) if chosen else []] = True
        tiny = np.flatnonzero(np.isin(labels, clusters[~big]))
        fill = rng.choice(tiny, size=min(budget - taken, len(tiny)), replace=False)
        chosen.append(fill)
        picked[fill] = True
        taken += len(fill)
        if taken < budget:
            chosen.append(rng.choice(np.flatnonzero(~picked), size=budget - taken, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def cluster_trajectories(
    trajectories: np.ndarray, num_clusters: int, seed: int, init: Literal["k-means++", "random"] = "k-means++"
) -> np.ndarray:
    """k-means labels (Euclidean) with `num_clusters` clamped to the number of distinct trajectories.

    `init="k-means++"`: scikit-learn's default seeding, best of 3 runs. `init="random"`: random
    initial centroids, one run of at most 20 iterations (the defaults of `faiss.Kmeans`, which
    the reference uses; the same algorithm, not the same random numbers).
    """
    distinct = len(np.unique(trajectories, axis=0))
    k = max(1, min(num_clusters, distinct))
    if k == 1:
        return np.zeros(len(trajectories), np.int64)
    if init == "random":
        kmeans = KMeans(n_clusters=k, init="random", n_init=1, max_iter=20, random_state=seed)
    else:
        kmeans = KMeans(n_clusters=k, n_init=3, random_state=seed)
    return kmeans.fit_predict(trajectories.astype(np.float64))


def proportional_quotas(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Largest-remainder split of `budget` in proportion to `sizes` (ties go to the earlier entry)."""
    exact = sizes / sizes.sum() * budget
    alloc = np.floor(exact).astype(np.int64)
    remainder = budget - alloc.sum()
    alloc[np.argsort(-(exact - alloc), kind="stable")[:remainder]] += 1
    return np.minimum(alloc, sizes)


def equal_quotas(sizes: np.ndarray, budget: int) -> np.ndarray:
    """The reference's split: sources visited smallest first (ties in order), each given
    `(budget - given) // sources_left`, capped at its size, so what a small source cannot use
    passes on to the larger ones."""
    alloc = np.zeros(len(sizes), np.int64)
    left = budget
    for j, s in enumerate(np.argsort(sizes, kind="stable")):
        alloc[s] = min(int(sizes[s]), left // (len(sizes) - j))
        left -= alloc[s]
    return alloc


def select_s2l(
    ctx: SelectionContext,
    num_clusters: int = 100,
    tiny_cluster: int = TINY_CLUSTER,
    stratify_by: str | None = None,
    stratify_split: Literal["equal", "proportional"] = "equal",
    kmeans_init: Literal["k-means++", "random"] = "k-means++",
    nan_policy: Literal["drop", "raise", "zero"] = "drop",
) -> Selection:
    """Balanced sampling over k-means clusters of loss trajectories.

    Args:
        num_clusters: K, clamped to the number of distinct trajectories.
        tiny_cluster: clusters of at most this many rows stay out of the balanced pass and only
            fill a remainder (2, as the reference); 0 puts every cluster in the pass.
        stratify_by: a column of the dataset (e.g. a `source`); the budget is split across its
            values and S2L runs within each.
        stratify_split: "equal" (the reference: an equal share per source, smallest first, what a
            small source cannot use passing on) or "proportional" (in proportion to source sizes).
        kmeans_init: "k-means++" (3 restarts) or "random" (one run, 20 iterations, as faiss).
        nan_policy: rows with a non-finite loss anywhere in their trajectory are left out and
            counted (`"drop"`), make the call fail (`"raise"`), or have their NaN losses set to 0
            (`"zero"`, the reference's choice). Rows the run never recorded are always left out.
    """
    if num_clusters < 1:
        raise ValueError("s2l: num_clusters must be at least 1")
    if tiny_cluster < 0:
        raise ValueError("s2l: tiny_cluster must be 0 or more")
    if nan_policy not in ("drop", "raise", "zero"):
        raise ValueError(f"s2l: nan_policy must be 'drop', 'raise' or 'zero', not {nan_policy!r}")
    if stratify_split not in ("equal", "proportional"):
        raise ValueError(f"s2l: stratify_split must be 'equal' or 'proportional', not {stratify_split!r}")
    if kmeans_init not in ("k-means++", "random"):
        raise ValueError(f"s2l: kmeans_init must be 'k-means++' or 'random', not {kmeans_init!r}")
    trajectories, source = ctx.trajectories("s2l")
    recorded = ctx.recorded_mask("s2l")  # trained rows whose record still fits the dataset
    nonfinite_recorded = np.flatnonzero(recorded & ~np.isfinite(trajectories).all(axis=1))
    if nan_policy == "raise" and len(nonfinite_recorded):
        raise ValueError(
            f"s2l: {len(nonfinite_recorded)} trained rows have non-finite losses in their trajectory "
            f"(first rows: {nonfinite_recorded[:5].tolist()}); use nan_policy='drop' to leave them out."
        )
    if nan_policy == "zero":
        trajectories[recorded[:, None] & np.isnan(trajectories)] = 0.0
    candidates = np.flatnonzero(np.isfinite(trajectories).all(axis=1))
    ctx.check_budget(len(candidates), "s2l", "rows with a complete, finite loss trajectory")
    rng = np.random.default_rng(ctx.seed)

    if stratify_by is None:
        groups = {None: candidates}
    else:
        if stratify_by not in ctx.dataset.column_names:
            raise ValueError(f"s2l: stratify_by={stratify_by!r} is not a column; columns: {ctx.dataset.column_names}")
        values = np.asarray(ctx.dataset[stratify_by], dtype=object)[candidates]
        groups = {v: candidates[values == v] for v in sorted(set(values.tolist()), key=str)}
    sizes = np.array([len(g) for g in groups.values()])
    split = equal_quotas if stratify_split == "equal" else proportional_quotas
    quotas = split(sizes, ctx.budget)

    chosen, clusters_used = [], {}
    for (name, members), quota in zip(groups.items(), quotas):
        if quota == 0 or quota >= len(members):  # the reference takes a source that fits its share whole
            chosen.append(members[:quota])
            clusters_used[str(name)] = 0
            continue
        labels = cluster_trajectories(trajectories[members], num_clusters, ctx.seed, kmeans_init)
        chosen.append(members[balanced_sample(labels, int(quota), rng, tiny_cluster)])
        clusters_used[str(name)] = int(labels.max()) + 1
    return Selection(
        indices=np.concatenate(chosen),
        method="s2l",
        params={
            "num_clusters": num_clusters,
            "tiny_cluster": tiny_cluster,
            "stratify_by": stratify_by,
            "stratify_split": stratify_split if stratify_by else None,
            "kmeans_init": kmeans_init,
            "nan_policy": nan_policy,
            "seed": ctx.seed,
        },
        info={
            "trajectory_source": source,
            "trajectory_length": int(trajectories.shape[1]),
            "clusters": clusters_used if stratify_by else clusters_used["None"],
            "rows_per_source": {str(n): int(q) for n, q in zip(groups, quotas)} if stratify_by else None,
            "rows_not_recorded": int((~recorded).sum()),
            "rows_with_nonfinite_loss": int(len(nonfinite_recorded)),
        },
    )
