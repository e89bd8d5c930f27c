"""G2IS: gradient-graph instruction selection with a gradient walk.

Zhao et al., 2025 (arXiv 2502.11062). Training rows are represented by Adam-preconditioned
gradients, target rows by plain gradients. PCA of the target features gives the "core
knowledge" (directions the target tasks need); each component gets a share of the budget.
For each component a walk over a cosine k-nearest-neighbour graph of the training rows
picks rows that reinforce the component and never conflict (negative inner product) with a
row already chosen, so the subset pulls the model one way instead of cancelling itself out.

Conventions used throughout (and why):

* Every feature row is L2-normalized first, so inner products are cosines and each chosen
  row counts equally in a running sum. Rows whose features are non-finite or zero are left
  out and counted, never repaired.
* Several snapshots: each snapshot's features are normalized and scaled by `sqrt(w_t)`
  (`w_t` = that snapshot's learning rate over the sum, as LESS weights snapshots), then
  concatenated. The inner product of two such rows is exactly `Σ_t w_t cos_t`, LESS's
  LR-weighted cosine, and the rows stay unit-norm.
* PCA signs are arbitrary, so each component is oriented so the mean target feature
  projects non-negatively onto it (if that projection is ~0, so its largest-magnitude
  loading is positive). Anchoring uses the signed cosine with the oriented component and
  the consistency rule uses the same signed cosine: `cos(sum ∪ x, k_c) ≥ δ · cos(sum, k_c)`.
  With a positive previous value this implies the paper's `|cos| ≥ δ · previous`; it only
  additionally refuses a running sum that flips to the anti-aligned side.
* Anchors (the first row of a component and every re-anchor) must point along the
  component (positive cosine) and obey both rules; walk steps obey both rules.
* Both conventions can be turned off to get the reference code's (`gradient_walk.py`)
  arithmetic: `orient_components=False` leaves each component's sign as scikit-learn's PCA
  leaves it (`svd_flip`: its largest-magnitude loading positive), and
  `signed_consistency=False` uses `|cos(sum ∪ x, k_c)| ≥ δ · |cos(sum, k_c)|` and anchors on
  the most aligned row that fits whatever the sign of its cosine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .base import Selection, SelectionContext, function_name

CONFLICT_TOL = 1e-6
"""A cosine counts as a conflict only below `-CONFLICT_TOL`: float noise on orthogonal rows is no conflict."""

CONSISTENCY_TOL = 1e-9
_ANCHOR_BATCH = 256


# ----------------------------------------------------------------------------- features


def _normalize_block(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 unit rows of `block` and which rows were usable (finite, non-zero); unusable rows become 0."""
    block = np.array(block, np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    ok = np.isfinite(block).all(axis=1) & np.isfinite(norms) & (norms > 0)
    block[~ok] = 0.0
    block[ok] /= norms[ok, None].astype(np.float32)
    return block, ok


def l2_normalize(features: np.ndarray, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm float32 copy of `features` (read in chunks, so a memory-mapped fp16 file works).

    Returns `(normalized, valid)`: rows with a non-finite entry or zero norm are left as zeros
    and marked `valid=False`.
    """
    return combine_snapshots([features], None, chunk_rows)


def combine_snapshots(
    per_snapshot: Sequence[np.ndarray], weights: Sequence[float] | None = None, chunk_rows: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """One unit-norm float32 row per example from features at several snapshots.

    Each snapshot's rows are normalized and scaled by `sqrt(w_t / Σw)`, then concatenated, so
    `<a, b> = Σ_t w_t cos_t(a, b)` (LESS's LR-weighted cosine). Returns `(features, valid)`;
    a row is valid only if it is valid at every snapshot (invalid rows are zeros). Inputs are
    read `chunk_rows` at a time, so the only full-size allocation is the output.
    """
    if len(per_snapshot) == 0:
        raise ValueError("combine_snapshots needs at least one snapshot")
    if any(np.ndim(f) != 2 for f in per_snapshot):
        raise ValueError(f"features must be 2-D (rows, dims), not shapes {[np.shape(f) for f in per_snapshot]}")
    w = np.ones(len(per_snapshot)) if weights is None else np.asarray(weights, np.float64)
    if len(w) != len(per_snapshot) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"snapshot weights must be {len(per_snapshot)} finite non-negative numbers, not {weights}")
    scale = np.sqrt(w / w.sum()).astype(np.float32)
    rows = {len(f) for f in per_snapshot}
    if len(rows) != 1:
        raise ValueError(f"every snapshot must have the same rows; got row counts {sorted(rows)}")
    n = rows.pop()
    bounds = np.cumsum([0] + [f.shape[1] for f in per_snapshot])
    out = np.empty((n, bounds[-1]), np.float32)
    valid = np.ones(n, bool)
    for lo in range(0, n, chunk_rows):
        hi = min(lo + chunk_rows, n)
        for t, f in enumerate(per_snapshot):
            block, ok = _normalize_block(f[lo:hi])
            out[lo:hi, bounds[t] : bounds[t + 1]] = block if len(per_snapshot) == 1 else block * scale[t]
            valid[lo:hi] &= ok
    out[~valid] = 0.0
    return out, valid


# ----------------------------------------------------------------------------- core knowledge


def num_components_for_share(explained_variance_ratio: np.ndarray, share: float) -> int:
    """The fewest leading components whose explained-variance ratios add up to at least `share`."""
    if not 0 < share <= 1:
        raise ValueError(f"variance share must be in (0, 1], not {share}")
    cumulative = np.cumsum(explained_variance_ratio)
    return int(min(np.searchsorted(cumulative, share - 1e-9) + 1, len(cumulative)))


def split_budget(weights: np.ndarray, budget: int) -> np.ndarray:
    """Largest-remainder split of `budget` rows in proportion to `weights` (ties go to the earlier entry)."""
    weights = np.asarray(weights, np.float64)
    if budget < 0 or len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"cannot split a budget of {budget} by weights {weights}")
    exact = weights / weights.sum() * budget
    alloc = np.floor(exact).astype(np.int64)
    extra = budget - int(alloc.sum())
    alloc[np.argsort(-(exact - alloc), kind="stable")[:extra]] += 1
    return alloc


@dataclass
class CoreKnowledge:
    """Oriented unit principal directions of the target features, with a budget weight each.

    `components` is (r, dims), ordered by `weight` (largest first; ties by task, then rank);
    `weights` sum to 1 (each task gets an equal share, split within the task in proportion
    to explained variance); `explained_variance_ratio` is relative to the component's own task.
    """

    components: np.ndarray
    weights: np.ndarray
    explained_variance_ratio: np.ndarray
    task: np.ndarray
    rank: np.ndarray
    degenerate_tasks: list[int]
    target_rows_dropped: list[int]


def _largest_loading_positive(component: np.ndarray) -> np.ndarray:
    """scikit-learn's sign (`svd_flip` on the components): the first largest-magnitude loading is positive."""
    return component if component[int(np.argmax(np.abs(component)))] > 0 else -component


def _orient(component: np.ndarray, mean: np.ndarray) -> np.ndarray:
    projection = float(component @ mean)
    if abs(projection) > 1e-9 * max(float(np.linalg.norm(mean)), 1e-30):
        return component if projection > 0 else -component
    return _largest_loading_positive(component)


def _principal_axes(centered: np.ndarray) -> tuple[np.ndarray, Callable[[int], np.ndarray]]:
    """Variances along the principal axes (descending) and a function giving the top r axes as unit rows.

    Eigendecomposition of the smaller of the Gram (rows × rows) and scatter (dims × dims)
    matrices: with a few hundred target rows of 8 192 dims this is ~100× faster than an SVD.
    """
    rows, dims = centered.shape
    small = centered @ centered.T if rows <= dims else centered.T @ centered
    vals, vecs = np.linalg.eigh(small)
    order = np.argsort(vals, kind="stable")[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]

    def directions(r: int) -> np.ndarray:
        axes = centered.T @ vecs[:, :r] if rows <= dims else vecs[:, :r]
        return (axes / np.linalg.norm(axes, axis=0, keepdims=True)).T

    return vals, directions


def core_knowledge(
    targets: np.ndarray | Sequence[np.ndarray],
    variance_share: float = 0.5,
    center: bool = True,
    orient_components: bool = True,
) -> CoreKnowledge:
    """PCA of each target task's normalized features, keeping components up to `variance_share`.

    `targets` is one (rows, dims) array or one per task. `center=False` decomposes the raw
    (uncentered) features, whose first direction is then close to the mean target gradient.
    Each component is oriented so the task's mean feature projects positively on it;
    `orient_components=False` gives it scikit-learn's sign instead (largest-magnitude loading
    positive, as `PCA.components_` after `svd_flip`), which is what the reference code uses.
    A task with a single usable row, or no variance, contributes its normalized mean as one
    component (listed in `degenerate_tasks`).
    """
    tasks = [targets] if isinstance(targets, np.ndarray) else list(targets)
    if not tasks:
        raise ValueError("g2is needs at least one target task")
    comps, ratios, task_of, rank_of, weights, degenerate, dropped = [], [], [], [], [], [], []
    for t, feats in enumerate(tasks):
        normed, valid = l2_normalize(feats)
        dropped.append(int((~valid).sum()))
        rows = normed[valid].astype(np.float64)
        if len(rows) == 0:
            raise ValueError(f"g2is: target task {t} has no row with finite, non-zero gradient features")
        mean = rows.mean(axis=0)
        centered = rows - mean if center else rows
        var, directions = _principal_axes(centered)
        if (len(rows) < 2 and center) or var.sum() <= 1e-12 * len(rows):
            if np.linalg.norm(mean) == 0:
                raise ValueError(f"g2is: target task {t} has a zero mean gradient and no variance")
            degenerate.append(t)
            task_comps, task_ratio = (mean / np.linalg.norm(mean))[None], np.ones(1)
        else:
            ratio = var / var.sum()
            r = num_components_for_share(ratio, variance_share)
            axes = directions(r)
            signed_axes = [_orient(a, mean) if orient_components else _largest_loading_positive(a) for a in axes]
            task_comps = np.stack(signed_axes)
            task_ratio = ratio[:r]
        comps.append(task_comps)
        ratios.append(task_ratio)
        weights.append(task_ratio / task_ratio.sum() / len(tasks))
        task_of.append(np.full(len(task_ratio), t))
        rank_of.append(np.arange(len(task_ratio)))
    weights_all = np.concatenate(weights)
    task_all, rank_all = np.concatenate(task_of), np.concatenate(rank_of)
    order = np.lexsort((rank_all, task_all, -weights_all))
    return CoreKnowledge(
        components=np.concatenate(comps)[order].astype(np.float32),
        weights=weights_all[order],
        explained_variance_ratio=np.concatenate(ratios)[order],
        task=task_all[order],
        rank=rank_all[order],
        degenerate_tasks=degenerate,
        target_rows_dropped=dropped,
    )


# ----------------------------------------------------------------------------- graph


def _sorted_top(sims: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the k largest `sims`, ordered by (-sim, index) so ties resolve deterministically."""
    vals, pos = torch.topk(sims, k, dim=1)
    idx = index[pos] if index.dim() == 1 else torch.gather(index, 1, pos)
    # order within each row by descending similarity, ties by ascending index
    key = torch.argsort(idx, dim=1, stable=True)
    vals, idx = torch.gather(vals, 1, key), torch.gather(idx, 1, key)
    key = torch.argsort(-vals, dim=1, stable=True)
    return torch.gather(vals, 1, key), torch.gather(idx, 1, key)


def knn_graph(
    features: np.ndarray, k: int, chunk_rows: int = 1024, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest-neighbour graph: `(neighbors, similarities)`, both (rows, k).

    Row i lists the k other rows most similar to row i (descending cosine, ties by index).
    Computed one block of `chunk_rows` query rows at a time, so memory is
    `rows × dims` floats plus `chunk_rows × rows` similarities, never rows × rows.
    Cost is `2 · rows² · dims` flops; rows with zero or non-finite features get no edges to
    others' lists (similarity -inf) and their own list is filled with -1. Passing `valid`
    says `features` are already unit rows (as from `l2_normalize`), which saves a copy.
    """
    n = len(features)
    if n < 2:
        raise ValueError("knn_graph needs at least two rows")
    k = min(int(k), n - 1)
    if k < 1:
        raise ValueError("knn_graph: k must be at least 1")
    if valid is None:
        normed, valid = l2_normalize(features)
    else:
        normed, valid = np.ascontiguousarray(features, np.float32), np.asarray(valid, bool)
    base = torch.from_numpy(normed)
    invalid = torch.from_numpy(~valid)
    neighbors = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)
    for lo in range(0, n, chunk_rows):
        hi = min(lo + chunk_rows, n)
        block = base[lo:hi] @ base.T
        block[:, invalid] = -math.inf
        block[torch.arange(hi - lo), torch.arange(lo, hi)] = -math.inf
        vals, idx = _sorted_top(block, torch.arange(n), k)
        neighbors[lo:hi], sims[lo:hi] = idx.numpy(), vals.numpy()
    neighbors[~valid] = -1
    sims[~valid] = -math.inf
    return neighbors, sims


class LazyNeighbors:
    """Exact kNN lists computed only for the rows a walk visits, a few rows per pass over the pool.

    Gives the same lists as `knn_graph` (up to float ties) without the `2 · rows² · dims` flops
    of the whole graph; a walk visits about `budget` rows. Reading the pool once costs about
    the same for one query row as for a few dozen (it is memory-bound), so when row i is asked
    for and not cached, the lists of up to `prefetch` more rows are computed in the same pass:
    the uncached members of the list returned last (the walk's previous row). The walk's next
    rows are usually among them, so most calls are cache hits. `features` must already be
    unit-norm rows (see `l2_normalize`); `valid` marks usable rows.
    """

    def __init__(self, features: np.ndarray, k: int, valid: np.ndarray | None = None, prefetch: int = 31):
        self.features = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        self.k = min(int(k), len(features) - 1)
        self.invalid = None if valid is None else torch.from_numpy(~np.asarray(valid, bool))
        self.prefetch = int(prefetch)
        self.cache: dict[int, np.ndarray] = {}
        self.last: np.ndarray = np.zeros(0, np.int64)
        self.calls = 0
        self.passes = 0

    def __call__(self, i: int) -> np.ndarray:
        self.calls += 1
        if i not in self.cache:
            extra = [int(j) for j in self.last if int(j) not in self.cache and j != i][: self.prefetch]
            self._compute([int(i), *extra])
        self.last = self.cache[int(i)]
        return self.last

    def _compute(self, rows: list[int]) -> None:
        self.passes += 1
        query = torch.tensor(rows, dtype=torch.long)
        sims = (self.features @ self.features[query].T).T.contiguous()  # (len(rows), pool)
        if self.invalid is not None:
            sims[:, self.invalid] = -math.inf
        sims[torch.arange(len(rows)), query] = -math.inf
        _, idx = _sorted_top(sims, torch.arange(sims.shape[1]), self.k)
        for row, neighbours in zip(rows, idx.numpy()):
            self.cache[row] = neighbours


class GraphNeighbors:
    """Neighbour lists read from a prebuilt graph (e.g. `knn_graph`)."""

    def __init__(self, neighbors: np.ndarray):
        self.neighbors = neighbors

    def __call__(self, i: int) -> np.ndarray:
        row = self.neighbors[i]
        return row[row >= 0]


# ----------------------------------------------------------------------------- walk


@dataclass
class WalkResult:
    """Rows in the order they were chosen, the component each was chosen for, and per-component counts."""

    indices: np.ndarray
    component: np.ndarray
    alignment: np.ndarray
    budgets: np.ndarray
    chosen: np.ndarray
    anchors: np.ndarray

    @property
    def reanchors(self) -> np.ndarray:
        """Anchors after a component's first one (the walk got stuck and restarted)."""
        return np.maximum(self.anchors - 1, 0)

    @property
    def shortfall(self) -> np.ndarray:
        return self.budgets - self.chosen


def gradient_walk(
    features: np.ndarray,
    components: np.ndarray,
    budgets: np.ndarray,
    neighbors: Callable[[int], np.ndarray],
    delta: float = 0.8,
    conflict_across_components: bool = True,
    valid: np.ndarray | None = None,
    signed_consistency: bool = True,
) -> WalkResult:
    """Pick up to `budgets[j]` rows for each component j, components in the given order.

    `features` are unit-norm rows; `components` unit rows; `neighbors(i)` gives row i's
    neighbour list, most similar first. Per component: anchor on the unused row most aligned
    with it; then repeatedly add the most similar neighbour of the last added row that
    (a) has a non-negative inner product with every row already chosen (for any component,
    unless `conflict_across_components=False`) and (b) keeps
    `cos(running sum, component) ≥ delta · previous value`; when no neighbour fits,
    re-anchor on the most aligned row that fits; stop at the budget or when nothing fits.
    Anchors need a positive cosine with the component. `signed_consistency=False` is the
    reference code's rule instead: (b) compares absolute values,
    `|cos(sum ∪ x, component)| ≥ delta · |previous|`, and anchors may have any sign.

    Selected features are kept in a matrix; a candidate is tested only against the rows
    chosen since it was last tested (one small matmul per batch of candidates), and a row
    found in conflict is marked dead for good, so no pair is tested twice.
    """
    walk = _Walk(features, budgets, valid, delta, signed_consistency)
    comps = np.asarray(components, np.float32)
    if len(comps) != len(walk.budgets):
        raise ValueError("one budget per component is needed")
    for j, comp in enumerate(comps):
        walk.run_component(j, comp, neighbors, conflict_across_components)
    return walk.result()


class _Walk:
    """State of a gradient walk: chosen rows (as a matrix), conflict marks, the running sum."""

    def __init__(
        self, features: np.ndarray, budgets: np.ndarray, valid: np.ndarray | None, delta: float, signed: bool = True
    ):
        self.x = np.ascontiguousarray(features, np.float32)
        self.n = len(self.x)
        self.budgets = np.asarray(budgets, np.int64)
        self.delta = delta
        self.signed = signed  # False: the reference's |cos| consistency rule, anchors of any sign
        self.usable = np.ones(self.n, bool) if valid is None else np.asarray(valid, bool).copy()
        self.chosen_rows = np.empty((int(self.budgets.sum()), self.x.shape[1]), np.float32)
        self.m = 0  # rows of chosen_rows in use
        self.selected = np.zeros(self.n, bool)
        self.dead = ~self.usable  # in conflict with a chosen row in scope (or unusable)
        self.checked = np.zeros(self.n, np.int64)  # chosen_rows[:checked[i]] already tested against row i
        self.scope = 0  # conflicts count against chosen_rows[scope:m]
        self.out_idx: list[int] = []
        self.out_comp: list[int] = []
        self.out_align: list[float] = []
        self.chosen = np.zeros(len(self.budgets), np.int64)
        self.anchors = np.zeros(len(self.budgets), np.int64)

    def fits(self, idx: np.ndarray, anchor: bool) -> np.ndarray:
        """Which of the unselected, not-dead rows `idx` pass the conflict and consistency rules now."""
        start = max(self.scope, int(self.checked[idx].min()))
        if self.m > start:
            ip = self.x[idx] @ self.chosen_rows[start : self.m].T
            self.dead[idx[(ip < -CONFLICT_TOL).any(axis=1)]] = True
        self.checked[idx] = self.m
        ok = ~self.dead[idx]
        if anchor and self.signed:
            ok &= self.align[idx] > 0
        if self.prev is not None:
            sx = self.x[idx].astype(np.float64) @ self.run_sum
            norm = np.sqrt(np.maximum(self.run_sum @ self.run_sum + 2 * sx + 1.0, 1e-30))
            new = (self.sum_dot_c + self.align[idx]) / norm
            if self.signed:
                ok &= new >= self.delta * self.prev - CONSISTENCY_TOL
            else:
                ok &= np.abs(new) >= self.delta * abs(self.prev) - CONSISTENCY_TOL
        return ok

    def anchor(self) -> int | None:
        """The most aligned row that fits, scanning rows in order of alignment, batch by batch."""
        order, align = self.order, self.align
        floor = 0.0 if self.signed else -math.inf  # anchors need a positive cosine unless unsigned
        while self.pointer < self.n and (self.selected[order[self.pointer]] or self.dead[order[self.pointer]]):
            self.pointer += 1
        pos = self.pointer
        while pos < self.n and align[order[pos]] > floor:
            batch = order[pos : pos + _ANCHOR_BATCH]
            batch = batch[~self.selected[batch] & ~self.dead[batch] & (align[batch] > floor)]
            if len(batch):
                ok = self.fits(batch, anchor=True)
                if ok.any():
                    return int(batch[np.argmax(ok)])
            pos += _ANCHOR_BATCH
        return None

    def step(self, last: int, neighbors: Callable[[int], np.ndarray]) -> int | None:
        """The most similar neighbour of `last` that fits, if any."""
        cand = np.asarray(neighbors(last), np.int64)
        cand = cand[~self.selected[cand] & ~self.dead[cand]]
        if len(cand):
            ok = self.fits(cand, anchor=False)
            if ok.any():
                return int(cand[np.argmax(ok)])
        return None

    def run_component(self, j: int, comp: np.ndarray, neighbors: Callable[[int], np.ndarray], across: bool) -> None:
        if self.budgets[j] == 0:
            return
        if not across:
            self.scope = self.m
            self.dead = ~self.usable
            self.checked[:] = self.m
        self.align = torch.from_numpy(self.x).mv(torch.from_numpy(comp)).numpy().astype(np.float64)
        self.order = np.lexsort((np.arange(self.n), -self.align))
        self.pointer = 0
        self.run_sum = np.zeros(self.x.shape[1], np.float64)
        self.sum_dot_c, self.prev = 0.0, None
        last = None
        while self.chosen[j] < self.budgets[j]:
            pick = None if last is None else self.step(last, neighbors)
            if pick is None:
                pick = self.anchor()
                if pick is None:
                    return
                self.anchors[j] += 1
            self.add(j, pick)
            last = pick

    def add(self, j: int, pick: int) -> None:
        self.chosen_rows[self.m] = self.x[pick]
        self.m += 1
        self.selected[pick] = True
        self.run_sum += self.x[pick]
        self.sum_dot_c += self.align[pick]
        self.prev = self.sum_dot_c / math.sqrt(max(float(self.run_sum @ self.run_sum), 1e-30))
        self.chosen[j] += 1
        self.out_idx.append(pick)
        self.out_comp.append(j)
        self.out_align.append(float(self.align[pick]))

    def result(self) -> WalkResult:
        return WalkResult(
            indices=np.asarray(self.out_idx, np.int64),
            component=np.asarray(self.out_comp, np.int64),
            alignment=np.asarray(self.out_align, np.float64),
            budgets=self.budgets,
            chosen=self.chosen,
            anchors=self.anchors,
        )


def aligned_topk(
    features: np.ndarray, components: np.ndarray, budgets: np.ndarray, valid: np.ndarray | None = None
) -> WalkResult:
    """Ablation without the graph: for each component, the `budgets[j]` unused rows most aligned with it."""
    x = np.ascontiguousarray(features, np.float32)
    budgets = np.asarray(budgets, np.int64)
    taken = np.zeros(len(x), bool) if valid is None else ~np.asarray(valid, bool)
    out_idx, out_comp, out_align = [], [], []
    chosen = np.zeros(len(budgets), np.int64)
    for j, comp in enumerate(np.asarray(components, np.float32)):
        align = (x @ comp).astype(np.float64)
        order = np.lexsort((np.arange(len(x)), -align))
        pick = order[~taken[order]][: budgets[j]]
        taken[pick] = True
        chosen[j] = len(pick)
        out_idx.extend(pick.tolist())
        out_comp.extend([j] * len(pick))
        out_align.extend(align[pick].tolist())
    return WalkResult(
        indices=np.asarray(out_idx, np.int64),
        component=np.asarray(out_comp, np.int64),
        alignment=np.asarray(out_align, np.float64),
        budgets=budgets,
        chosen=chosen,
        anchors=np.zeros(len(budgets), np.int64),
    )


# ----------------------------------------------------------------------------- whole method on arrays


@dataclass
class G2ISResult:
    """What `g2is_arrays` did: the walk (or ablation), the core knowledge, and which rows were usable."""

    walk: WalkResult
    core: CoreKnowledge
    valid: np.ndarray
    graph: str


def g2is_arrays(
    train: np.ndarray | Sequence[np.ndarray],
    targets: np.ndarray | Sequence[np.ndarray],
    budget: int,
    *,
    snapshot_weights: Sequence[float] | None = None,
    variance_share: float = 0.5,
    delta: float = 0.8,
    num_neighbors: int = 32,
    conflict_across_components: bool = True,
    use_graph: bool = True,
    graph: Literal["lazy", "full"] = "lazy",
    center: bool = True,
    chunk_rows: int = 1024,
    orient_components: bool = True,
    signed_consistency: bool = True,
) -> G2ISResult:
    """G2IS on feature arrays: `train` (rows, dims), `targets` one (rows, dims) array per task.

    `train` may also be a list of per-snapshot arrays, combined with `snapshot_weights`
    (see `combine_snapshots`; target arrays must then be combined the same way already).

    `graph="lazy"` computes exact neighbour lists only for visited rows; `graph="full"` builds
    the whole exact kNN graph first (same lists; worth it only when the budget is a large
    share of the pool). `use_graph=False` is the paper's "w/o graph" ablation.
    `orient_components` and `signed_consistency` are described in `select_g2is`.
    """
    if graph not in ("lazy", "full"):
        raise ValueError(f"g2is: graph must be 'lazy' or 'full', not {graph!r}")
    if not 0 < delta <= 1:
        raise ValueError(f"g2is: delta must be in (0, 1], not {delta}")
    if isinstance(train, np.ndarray):
        normed, valid = l2_normalize(train)
    else:
        normed, valid = combine_snapshots(train, snapshot_weights)
    if budget > int(valid.sum()):
        raise ValueError(
            f"budget of {budget} rows is more than the {int(valid.sum())} training rows with usable gradient features"
        )
    core = core_knowledge(targets, variance_share=variance_share, center=center, orient_components=orient_components)
    budgets = split_budget(core.weights, budget)
    if not use_graph:
        return G2ISResult(aligned_topk(normed, core.components, budgets, valid), core, valid, "none")
    if graph == "full":
        neighbors = GraphNeighbors(knn_graph(normed, num_neighbors, chunk_rows, valid)[0])
    else:
        neighbors = LazyNeighbors(normed, num_neighbors, valid)
    walk = gradient_walk(
        normed, core.components, budgets, neighbors, delta, conflict_across_components, valid, signed_consistency
    )
    return G2ISResult(walk, core, valid, graph)


def describe(result: G2ISResult, task_names: Sequence[str]) -> dict[str, Any]:
    """`Selection.info` for a G2IS run: per-component budget, chosen, anchors, shortfall."""
    core, walk = result.core, result.walk
    per_component = [
        {
            "task": task_names[int(core.task[j])],
            "rank": int(core.rank[j]),
            "explained_variance_ratio": float(core.explained_variance_ratio[j]),
            "weight": float(core.weights[j]),
            "budget": int(walk.budgets[j]),
            "chosen": int(walk.chosen[j]),
            "reanchors": int(walk.reanchors[j]),
            "shortfall": int(walk.shortfall[j]),
        }
        for j in range(len(core.weights))
    ]
    return {
        "graph": result.graph,
        "num_components": len(core.weights),
        "components": per_component,
        "chosen_per_component": walk.chosen.tolist(),
        "reanchors": int(walk.reanchors.sum()),
        "shortfall": int(walk.shortfall.sum()),
        "degenerate_target_tasks": [task_names[t] for t in core.degenerate_tasks],
        "target_rows_without_features": dict(zip(task_names, core.target_rows_dropped)),
        "train_rows_without_features": int((~result.valid).sum()),
    }


# ----------------------------------------------------------------------------- the registered method


def _load_features(
    ctx: SelectionContext, targets: Any, task_column: str | None, **feature_args: Any
) -> tuple[list[np.ndarray], list[float], list[np.ndarray], list[str], dict[str, Any]]:
    """Per-snapshot Adam-preconditioned train features, snapshot-combined plain target features per task.

    Both come from the featurizer's cache in the store (computed there when missing), with the
    same arguments LESS uses, so the two methods share cached features. Train features stay
    per snapshot (memory-mapped) so they are normalized and combined once, in `g2is_arrays`.
    """
    from datasets import Dataset

    from ..featurize import check_same_space, gradient_features

    store = ctx.require_store("g2is")
    if isinstance(targets, Mapping):
        named = {str(name): ds for name, ds in targets.items()}
    else:
        named = {"target": targets}
    if not named or not all(isinstance(ds, Dataset) and len(ds) > 0 for ds in named.values()):
        raise ValueError("g2is: targets must be a non-empty datasets.Dataset or a {task name: Dataset} mapping")
    adam_form = feature_args.pop("adam_form")
    train = gradient_features(store, ctx.dataset, preconditioner=adam_form, **feature_args)
    weights = [fs.weight for fs in train]
    names: list[str] = []
    target_feats: list[np.ndarray] = []
    for name, ds in named.items():
        feats = gradient_features(store, ds, preconditioner="none", **feature_args)
        if [fs.step for fs in feats] != [fs.step for fs in train]:
            raise ValueError("g2is: train and target features come from different snapshots")
        for tr, tg in zip(train, feats):
            check_same_space(tr, tg)
        combined = combine_snapshots([fs.unit for fs in feats], weights)[0]
        if task_column is not None and task_column in ds.column_names:
            tasks = np.asarray(ds[task_column], dtype=object)
            for task in sorted(set(tasks.tolist()), key=str):
                names.append(str(task) if len(named) == 1 else f"{name}/{task}")
                target_feats.append(combined[tasks == task])
        else:
            names.append(name)
            target_feats.append(combined)
    info = {
        "snapshots": [{"step": fs.step, "weight": fs.weight, "lr_mean": fs.lr_mean} for fs in train],
        "feature_dims": int(sum(fs.unit.shape[1] for fs in train)),
        "spec": train[0].spec.to_dict() | {"param_names": len(train[0].spec.param_names)},
        "compute_dtype": train[0].meta.get("compute_dtype", "float32"),
    }
    return [fs.unit for fs in train], weights, target_feats, names, info


def select_g2is(
    ctx: SelectionContext,
    targets: Any,
    task_column: str | None = "task",
    variance_share: float = 0.5,
    delta: float = 0.8,
    num_neighbors: int = 32,
    conflict_across_components: bool = True,
    use_graph: bool = True,
    graph: Literal["lazy", "full"] = "lazy",
    center: bool = True,
    orient_components: bool = True,
    signed_consistency: bool = True,
    k: int | None = 8192,
    projection_seed: int = 0,
    projection: Literal["tensor", "sparse", "rademacher", "gaussian"] = "tensor",
    adam_form: Literal["adam", "adam_reference", "adam_factored"] = "adam",
    steps: Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    model=None,
    tokenizer=None,
    formatting_func: Callable[[dict], str] | None = None,
) -> Selection:
    """G2IS: per core-knowledge component, a conflict-free gradient walk over a cosine kNN graph.

    Args:
        targets: target (validation) rows with `prompt`/`completion` (or `text`), or a
            `{task name: Dataset}` mapping. Rows are grouped into tasks by `task_column` when a
            dataset has it. Every task gets an equal share of the budget.
        variance_share: keep principal components of each task's target features up to this
            share of explained variance (0.5 in the paper); the task's share of the budget is
            split across them in proportion to explained variance (largest remainder).
        delta: consistency factor δ: each added row must keep `cos(sum, k_c) ≥ δ · previous`.
        num_neighbors: k of the cosine kNN graph.
        conflict_across_components: a row may not conflict with rows chosen for other
            components either (True), or only with those of its own component (False).
        use_graph: False runs the paper's "w/o graph" ablation: per component, the top aligned rows.
        graph: "lazy" (exact neighbour lists for visited rows only) or "full" (whole graph first).
        center: centre target features before PCA (standard PCA).
        orient_components: orient each component so the task's mean target feature projects
            positively on it (PCA signs are arbitrary; a flipped component would anchor on rows
            pointing away from the target). False leaves scikit-learn's sign (`svd_flip`:
            largest-magnitude loading positive), as the reference code does.
        signed_consistency: the consistency rule compares signed cosines,
            `cos(sum ∪ x, k_c) ≥ δ · cos(sum, k_c)`, and anchors need a positive cosine with the
            component. False is the reference code's arithmetic: `|cos(sum ∪ x, k_c)| ≥ δ ·
            |cos(sum, k_c)|` (a running sum may flip to the anti-aligned side), and the first
            anchor and every re-anchor are the most aligned row that fits, whatever its sign.
            `orient_components=False, signed_consistency=False, conflict_across_components=False`
            reproduces the reference's walk.
        k, projection_seed, projection, adam_form, steps, batch_size, max_length, model, tokenizer,
        formatting_func: the gradient features, exactly as for LESS (cached in the store and shared with it).

    Several snapshots: rows are combined as `concat_t sqrt(w_t) · unit_t` with the featurizer's
    learning-rate weights `w_t`, so every inner product is LESS's LR-weighted cosine.

    Nothing is random: the same features give the same rows whatever the selector's `seed`
    (the projection has its own `projection_seed`). Ties are broken by row index.

    Each row's score is its cosine with the component it was chosen for. When the walk runs
    out of rows that fit, fewer rows than the budget come back: `info["shortfall"]` (and each
    component's entry in `info["components"]`) says how many, and a warning is raised.
    """
    train, weights, target_feats, names, feature_info = _load_features(
        ctx,
        targets,
        task_column,
        k=k, seed=projection_seed, kind=projection, adam_form=adam_form, steps=steps, batch_size=batch_size,
        max_length=max_length, model=model, tokenizer=tokenizer, formatting_func=formatting_func,
    )  # fmt: skip
    result = g2is_arrays(
        train,
        target_feats,
        ctx.budget,
        snapshot_weights=weights,
        variance_share=variance_share,
        delta=delta,
        num_neighbors=num_neighbors,
        conflict_across_components=conflict_across_components,
        use_graph=use_graph,
        graph=graph,
        center=center,
        orient_components=orient_components,
        signed_consistency=signed_consistency,
    )
    info = {**describe(result, names), **feature_info}
    caveats = []
    if info["shortfall"]:
        caveats.append(
            f"g2is chose {len(result.walk.indices)} of {ctx.budget} rows: no remaining row fits the conflict and "
            "consistency rules (see Selection.info['components'])."
        )
    for caveat in caveats:
        warnings.warn(caveat, stacklevel=2)
    return Selection(
        indices=result.walk.indices,
        scores=result.walk.alignment,
        method="g2is",
        params={
            "targets": names,
            "task_column": task_column,
            "variance_share": variance_share,
            "delta": delta,
            "num_neighbors": num_neighbors,
            "conflict_across_components": conflict_across_components,
            "use_graph": use_graph,
            "graph": graph,
            "center": center,
            "orient_components": orient_components,
            "signed_consistency": signed_consistency,
            "k": k,
            "projection_seed": projection_seed,
            "projection": projection,
            "adam_form": adam_form,
            "steps": [snap["step"] for snap in feature_info["snapshots"]],
            "compute_dtype": feature_info["compute_dtype"],
            "batch_size": batch_size,
            "max_length": max_length,
            "formatting_func": function_name(formatting_func),
        },
        info=info,
        warnings=caveats,
    )
