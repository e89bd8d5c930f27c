"""G2IS on hand-built vectors (choices worked out by hand), the graph against brute force, and the method."""

from __future__ import annotations

import numpy as np
import pytest

from hf_datasel.methods.g2is import (
    GraphNeighbors,
    LazyNeighbors,
    combine_snapshots,
    core_knowledge,
    describe,
    g2is_arrays,
    gradient_walk,
    knn_graph,
    l2_normalize,
    num_components_for_share,
    split_budget,
)


def unit(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at the given angles (degrees from the x axis)."""
    rad = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def walk(rows, components, budgets, k, delta=0.8, across=True, lazy=False):
    rows = np.asarray(rows, np.float32)
    nbrs = LazyNeighbors(rows, k) if lazy else GraphNeighbors(knn_graph(rows, k)[0])
    return gradient_walk(rows, np.asarray(components, np.float32), np.asarray(budgets), nbrs, delta, across)


# ----------------------------------------------------------------------------- features


def test_combined_snapshots_give_the_lr_weighted_cosine():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 4)) * 10
    b[2] = np.nan  # undefined at one snapshot: left out altogether
    combined, valid = combine_snapshots([a, b], [3.0, 1.0], chunk_rows=2)
    assert valid.tolist() == [True, True, False, True, True] and not combined[2].any()
    ua, ub = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    expected = 0.75 * ua @ ua.T + 0.25 * ub @ ub.T
    ok = np.flatnonzero(valid)
    np.testing.assert_allclose((combined @ combined.T)[np.ix_(ok, ok)], expected[np.ix_(ok, ok)], atol=1e-6)


# ----------------------------------------------------------------------------- budget split and PCA


def test_split_budget_largest_remainder():
    # exact shares 3.5, 2.1, 1.4 -> floors 3, 2, 1 (6 rows); the one left goes to the largest remainder (0.5)
    assert split_budget(np.array([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]
    # equal remainders: the earlier entries win the ties
    assert split_budget(np.array([1.0, 1.0, 1.0]), 2).tolist() == [1, 1, 0]
    # shares 1.8, 1.2 -> floors 1, 1; the remainder 0.8 beats 0.2
    assert split_budget(np.array([0.6, 0.4]), 3).tolist() == [2, 1]
    assert split_budget(np.array([0.25, 0.75]), 0).tolist() == [0, 0]


def test_num_components_for_share():
    ratio = np.array([0.4, 0.3, 0.2, 0.1])
    assert num_components_for_share(ratio, 0.5) == 2  # 0.4 < 0.5 <= 0.7
    assert num_components_for_share(ratio, 0.4) == 1  # reaching the share exactly is enough
    assert num_components_for_share(ratio, 0.71) == 3
    assert num_components_for_share(ratio, 1.0) == 4
    with pytest.raises(ValueError):
        num_components_for_share(ratio, 0.0)


def test_core_knowledge_components_at_variance_share():
    # four rows (±3, ±1, 0)/sqrt(10): already unit, mean zero; variance 0.9 along x, 0.1 along y
    rows = np.array([[3, 1, 0], [3, -1, 0], [-3, 1, 0], [-3, -1, 0]], np.float64) / np.sqrt(10)
    core = core_knowledge(rows, variance_share=0.5)
    assert len(core.components) == 1
    np.testing.assert_allclose(core.explained_variance_ratio, [0.9], atol=1e-6)
    # the mean is zero, so the sign falls back to "largest loading positive": +x
    np.testing.assert_allclose(core.components[0], [1, 0, 0], atol=1e-6)
    core = core_knowledge(rows, variance_share=0.95)
    assert len(core.components) == 2
    np.testing.assert_allclose(core.weights, [0.9, 0.1], atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 30), (60, 5)], ids=["rows<dims", "rows>dims"])
def test_core_knowledge_matches_an_svd(shape):
    rng = np.random.default_rng(2)
    targets = rng.normal(size=shape) * np.linspace(3, 0.5, shape[1]) + 1.0
    unit_rows = l2_normalize(targets)[0].astype(np.float64)
    _, sing, vt = np.linalg.svd(unit_rows - unit_rows.mean(axis=0), full_matrices=False)
    ratio = sing**2 / (sing**2).sum()
    core = core_knowledge(targets, variance_share=0.8)
    r = num_components_for_share(ratio, 0.8)
    np.testing.assert_allclose(core.explained_variance_ratio, ratio[:r], atol=1e-9)
    np.testing.assert_allclose(np.abs((core.components @ vt[:r].T).diagonal()), 1.0, atol=1e-5)


def test_components_point_along_the_mean_target():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(40, 6)) + np.array([3.0, -2.0, 0, 0, 1.0, 0])
    mean = l2_normalize(targets)[0].mean(axis=0)
    core = core_knowledge(targets, variance_share=1.0)
    assert (core.components @ mean > 0).all()
    # flipping every target flips the mean and so every component: signs follow the data, not the solver
    flipped = core_knowledge(-targets, variance_share=1.0)
    np.testing.assert_allclose(flipped.components, -core.components, atol=1e-5)


def test_core_knowledge_several_tasks_share_the_budget_equally():
    task_a = unit(0, 0, 0)  # no variance: the task's (normalized) mean is its one component
    task_b = np.array([[0, 0.6, 0.8], [0, 0.6, -0.8]], np.float32)  # variance along z only
    core = core_knowledge([np.c_[task_a, np.zeros(3)], task_b], variance_share=0.5)
    assert core.degenerate_tasks == [0]
    np.testing.assert_allclose(core.weights, [0.5, 0.5])
    assert core.task.tolist() == [0, 1]
    np.testing.assert_allclose(core.components[0], [1, 0, 0], atol=1e-6)
    # task b's component is ±z; its mean (0, 0.6, 0) projects to 0, so the largest loading is made positive
    np.testing.assert_allclose(core.components[1], [0, 0, 1], atol=1e-6)


# ----------------------------------------------------------------------------- the walk by hand


def test_walk_follows_the_graph_and_stops_at_conflicts():
    # component along 0 deg; rows at 0, 55, -70, 85, -30 deg; every other row is a neighbour (k=4)
    rows = unit(0, 55, -70, 85, -30)
    result = walk(rows, unit(0), [4], k=4, delta=0.1)
    # anchor: row 0 (cos 1). Its nearest neighbour is row 4 (30 deg away) -> add.
    # Row 4 (-30 deg): nearest unselected is row 2 (-70, 40 deg away) -> no conflict, add.
    # Row 2 (-70): rows 1 (55) and 3 (85) are 125 and 155 deg away -> conflict; no neighbour fits.
    # Re-anchor: the remaining rows 1 and 3 both conflict with row 2 -> nothing fits: one row short.
    assert result.indices.tolist() == [0, 4, 2]
    assert result.anchors.tolist() == [1]
    assert result.shortfall.tolist() == [1]


def test_consistency_rule_passes_over_the_nearest_neighbour():
    # component along 0 deg; rows at 20, 45, -25 deg. Anchor: row 0 (cos 20 = 0.940 is the best).
    # Its nearest neighbour is row 1 (25 deg away); the sum of 20 and 45 points at 32.5 deg,
    # cos 32.5 = 0.843 < 0.95 * 0.940 = 0.893, so delta=0.95 refuses it and takes row 2 instead
    # (sum points at -2.5 deg, cos 0.999). With delta=0.5 the nearest neighbour is fine.
    rows = unit(20, 45, -25)
    assert walk(rows, unit(0), [2], k=2, delta=0.95).indices.tolist() == [0, 2]
    assert walk(rows, unit(0), [2], k=2, delta=0.5).indices.tolist() == [0, 1]


def test_reanchors_when_the_neighbours_are_used_up():
    # component along 0 deg; two pairs of rows: (5, 10) and (-40, -45) deg; k=1.
    # Anchor row 0 (5 deg); its only neighbour is row 1 -> add. Row 1's only neighbour is row 0
    # (taken) -> re-anchor on the best remaining row, row 2 (-40 deg, no conflict: 45 and 50 deg
    # from the others); its only neighbour is row 3 -> add. Budget met with one re-anchor.
    rows = unit(5, 10, -40, -45)
    result = walk(rows, unit(0), [4], k=1, delta=0.1)
    assert result.indices.tolist() == [0, 1, 2, 3]
    assert result.reanchors.tolist() == [1]
    assert result.shortfall.tolist() == [0]


def test_conflicts_count_across_components_unless_turned_off():
    # components along 0 and 90 deg, one row each. Component 0 anchors on row 0 (-10 deg).
    # For component 1 the best-aligned row is row 1 (95 deg), but it is 105 deg from row 0 (a
    # conflict), so row 2 (60 deg, 70 deg from row 0) is taken instead. Without the cross-component
    # rule row 1 is fine.
    rows = unit(-10, 95, 60)
    assert walk(rows, unit(0, 90), [1, 1], k=2).indices.tolist() == [0, 2]
    assert walk(rows, unit(0, 90), [1, 1], k=2, across=False).indices.tolist() == [0, 1]


def test_rows_pointing_away_from_the_component_never_anchor():
    rows = unit(120, 180, -150)  # all have a negative cosine with the component at 0 deg
    result = walk(rows, unit(0), [2], k=2)
    assert len(result.indices) == 0 and result.shortfall.tolist() == [2]


# ----------------------------------------------------------------------------- graph


def test_knn_graph_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(53, 8)).astype(np.float32)
    neighbors, sims = knn_graph(x, k=5, chunk_rows=7)  # several chunks, the last one partial
    unit_rows = x / np.linalg.norm(x, axis=1, keepdims=True)
    dense = unit_rows @ unit_rows.T
    np.fill_diagonal(dense, -np.inf)
    expected = np.argsort(-dense, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(neighbors, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(dense, expected, axis=1), atol=1e-6)
    lazy = LazyNeighbors(unit_rows, k=5, prefetch=3)
    for i in (0, *expected[0], 17, 52, *expected[52]):  # lists served from prefetched rows are exact too
        np.testing.assert_array_equal(lazy(i), expected[i])
    assert lazy.passes < lazy.calls


def test_knn_graph_skips_rows_without_features():
    x = np.array([[1, 0], [np.nan, 1], [1, 0.1], [0, 0], [0.9, 0.5]], np.float32)
    neighbors, _ = knn_graph(x, k=2)
    assert neighbors[1].tolist() == [-1, -1] and neighbors[3].tolist() == [-1, -1]
    assert set(neighbors[[0, 2, 4]].ravel().tolist()) <= {0, 2, 4}


# ----------------------------------------------------------------------------- whole method on arrays


def clustered(n=300, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, d))
    shared = rng.normal(size=d) * 2
    labels = rng.integers(0, 6, n)
    train = shared + centers[labels] + 0.7 * rng.normal(size=(n, d))
    targets = shared + centers[[0, 1]][rng.integers(0, 2, 40)] + 0.7 * rng.normal(size=(40, d))
    return train.astype(np.float32), targets.astype(np.float32)


def test_lazy_and_full_graph_agree_and_repeat():
    train, targets = clustered()
    lazy = g2is_arrays(train, targets, 30, num_neighbors=8, graph="lazy")
    again = g2is_arrays(train, targets, 30, num_neighbors=8, graph="lazy")
    full = g2is_arrays(train, targets, 30, num_neighbors=8, graph="full")
    np.testing.assert_array_equal(lazy.walk.indices, again.walk.indices)
    np.testing.assert_array_equal(lazy.walk.indices, full.walk.indices)
    # no two chosen rows conflict
    x = l2_normalize(train)[0][lazy.walk.indices]
    assert (x @ x.T >= -1e-6).all()


def test_shortfall_is_reported_in_info():
    # rows at 0, 55, -70, 85, -30 deg as in the hand-worked walk, plus a target along 0 deg: 3 of 4 fit
    rows = unit(0, 55, -70, 85, -30)
    result = g2is_arrays(rows, unit(0, 0), 4, num_neighbors=4, delta=0.1)
    info = describe(result, ["t"])
    assert result.walk.indices.tolist() == [0, 4, 2]
    assert info["shortfall"] == 1 and info["chosen_per_component"] == [3]
    assert info["components"][0]["budget"] == 4 and info["components"][0]["shortfall"] == 1


def test_without_graph_takes_the_most_aligned_rows():
    rows = unit(0, 55, -70, 85, -30)
    result = g2is_arrays(rows, unit(0, 0), 4, use_graph=False)
    # cosines with 0 deg: 1, 0.57, 0.34, 0.09, 0.87 -> rows 0, 4, 1, 2 (no conflict rule)
    assert result.walk.indices.tolist() == [0, 4, 1, 2]
    assert result.graph == "none"


def test_rows_without_features_are_never_chosen():
    train, targets = clustered(n=80)
    train[[3, 5]] = np.nan
    train[7] = 0
    result = g2is_arrays(train, targets, 10, num_neighbors=6)
    assert not set(result.walk.indices.tolist()) & {3, 5, 7}
    assert int((~result.valid).sum()) == 3


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_through_selector(tmp_path, tokenizer):
    import warnings

    from hf_datasel.featurize import gradient_features
    from hf_datasel.selector import DataSelector
    from hf_datasel.synthetic import make_pool
    from tests.gradient_store import make_snapshot_store

    pool = make_pool(40, seed=1)
    store, _ = make_snapshot_store(tmp_path, tokenizer, pool)
    if not store.exists():  # snapshots only (no loss recorder): the selector still wants a manifest
        store.write_manifest({"model": "tiny-llama"})
    targets = make_pool(10, tasks=("add", "reverse"), seed=7)
    selector = DataSelector(pool, store)
    feature_args = dict(k=64, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a shortfall warning is allowed here; it is checked through info
        sel = selector.run("g2is", budget=8, targets=targets, **feature_args)
        again = selector.run("g2is", budget=8, targets=targets, **feature_args)
        subset = selector.select("g2is", budget=8, targets=targets, use_graph=False, **feature_args)
        task = np.asarray(targets["task"])
        named = {name: targets.select(np.flatnonzero(task == t)) for name, t in (("a", "add"), ("r", "reverse"))}
        by_name = selector.run("g2is", budget=8, seed=5, targets=named, task_column=None, **feature_args)
    np.testing.assert_array_equal(sel.indices, again.indices)
    # a {name: Dataset} mapping is the same tasks as the task column; the seed plays no part (nothing is random)
    assert by_name.params["targets"] == ["a", "r"]
    np.testing.assert_array_equal(sel.indices, by_name.indices)
    assert sel.params["targets"] == ["add", "reverse"] and sel.params["steps"] == [2, 4]
    assert len(sel.indices) + sel.info["shortfall"] == 8
    assert len(sel.warnings) == bool(sel.info["shortfall"])  # the shortfall warning stays with the selection
    assert all(f"g2is chose {len(sel.indices)} of 8 rows" in w for w in sel.warnings)
    assert sum(c["budget"] for c in sel.info["components"]) == 8
    assert {c["task"] for c in sel.info["components"]} == {"add", "reverse"}
    assert len(subset) == 8 and subset.column_names == pool.column_names

    # the same selection from the cached features by hand: Adam train features, plain target features
    train = gradient_features(store, pool, preconditioner="adam", seed=0, progress=False, **feature_args)
    target = gradient_features(store, targets, preconditioner="none", seed=0, progress=False, **feature_args)
    weights = [fs.weight for fs in train]
    combined = combine_snapshots([fs.unit for fs in target], weights)[0]
    task = np.asarray(targets["task"])
    by_hand = g2is_arrays(
        [fs.unit for fs in train], [combined[task == "add"], combined[task == "reverse"]], 8, snapshot_weights=weights
    )
    np.testing.assert_array_equal(sel.indices, np.sort(by_hand.walk.indices))


def test_method_warns_and_reports_a_shortfall(monkeypatch):
    from datasets import Dataset

    from hf_datasel.methods import g2is as g2is_module
    from hf_datasel.methods.base import SelectionContext

    # the hand-worked rows again (3 of 4 fit), served in place of the featurizer's cached features
    def fake_features(ctx, targets, task_column, **feature_args):
        return [unit(0, 55, -70, 85, -30)], [1.0], [unit(0, 0)], ["t"], {"snapshots": [], "compute_dtype": "float32"}

    monkeypatch.setattr(g2is_module, "_load_features", fake_features)
    ctx = SelectionContext(store=None, dataset=Dataset.from_dict({"text": list("abcde")}), budget=4)
    with pytest.warns(UserWarning, match="chose 3 of 4 rows"):
        sel = g2is_module.select_g2is(ctx, targets=None, num_neighbors=4, delta=0.1)
    assert sel.indices.tolist() == [0, 2, 4] and sel.info["shortfall"] == 1
    assert sel.info["components"][0] | {"explained_variance_ratio": None, "weight": None} == {
        "task": "t", "rank": 0, "explained_variance_ratio": None, "weight": None,
        "budget": 4, "chosen": 3, "reanchors": 0, "shortfall": 1,
    }  # fmt: skip
    np.testing.assert_allclose(sel.scores, np.cos(np.deg2rad([0, -70, -30])), atol=1e-6)


# ----------------------------------------------------------------------------- reference mode (gradient_walk.py)


def reference_walk(rows, components, budgets, delta, k=None):
    """The reference's `GraphWalk.graph_walk`, loop for loop, on unit rows with a brute-force sorted k-NN graph.

    Conflicts are checked within the component's own rows (`< 0`), the consistency rule is
    `|cos(sum ∪ x, k)| ≥ δ · |cos(sum, k)|`, the first anchor is the most aligned unused row
    whatever its sign, and a fallback takes the most aligned unused row that passes both rules.
    """
    x = np.asarray(rows, np.float64)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    k = len(x) - 1 if k is None else k
    graph = [sorted(range(len(x)), key=lambda j, i=i: (-sims[i, j], j))[:k] for i in range(len(x))]
    excluded, selected = set(), []

    def cos(vec, kv):
        return abs(vec @ kv) / np.linalg.norm(vec)

    for kv, budget in zip(np.asarray(components, np.float64), budgets):
        if budget <= 0:
            continue
        align = x @ kv
        by_alignment = sorted(range(len(x)), key=lambda j: (-align[j], j))
        free = [j for j in by_alignment if j not in excluded]
        if not free:
            break
        current = [free[0]]
        excluded.add(free[0])
        total = x[free[0]].copy()
        while len(current) < budget:
            old = cos(total, kv)
            pick = None
            # the last row's neighbours first, then (fallback) every row in order of alignment
            for j in [*graph[current[-1]], *by_alignment]:
                if j in excluded or (x[current] @ x[j] < 0).any():
                    continue
                if cos(total + x[j], kv) >= delta * old - 1e-12:
                    pick = j
                    break
            if pick is None:
                break
            current.append(pick)
            excluded.add(pick)
            total += x[pick]
        selected.extend(current)
    return selected


def test_unoriented_components_keep_scikit_learns_sign():
    # target rows at -10, 0 and 50 deg: the mean points at about 13 deg, the principal axis lies
    # along the chord from -10 to 50 deg, about 112 deg (or -68 deg). svd_flip makes the
    # largest-magnitude loading (y, 0.93) positive: 112 deg, on which the mean projects negatively
    # (the two are 99 deg apart). Oriented, the component points at -68 deg instead.
    targets = unit(-10, 0, 50).astype(np.float64)
    centered = targets - targets.mean(axis=0)
    axis = np.linalg.svd(centered)[2][0]
    by_hand = axis if axis[np.argmax(np.abs(axis))] > 0 else -axis
    assert by_hand[1] > 0.9 and by_hand @ targets.mean(axis=0) < 0
    unoriented = core_knowledge(targets, variance_share=0.5, orient_components=False)
    oriented = core_knowledge(targets, variance_share=0.5)
    np.testing.assert_allclose(unoriented.components[0], by_hand, atol=1e-6)
    np.testing.assert_allclose(oriented.components[0], -by_hand, atol=1e-6)

    # train rows at -60 and 110 deg: the oriented component (-68 deg) anchors on the first,
    # scikit-learn's sign (112 deg) on the second
    rows = unit(-60, 110)
    assert g2is_arrays(rows, targets, 1, num_neighbors=1).walk.indices.tolist() == [0]
    assert g2is_arrays(rows, targets, 1, num_neighbors=1, orient_components=False).walk.indices.tolist() == [1]


def test_unoriented_components_equal_scikit_learns_pca():
    decomposition = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(4)
    targets = rng.normal(size=(30, 6)) * np.linspace(3, 0.5, 6) + rng.normal(size=6)
    unit_rows = l2_normalize(targets)[0].astype(np.float64)
    core = core_knowledge(targets, variance_share=0.8, orient_components=False)
    pca = decomposition.PCA(n_components=len(core.components), svd_solver="full").fit(unit_rows)
    np.testing.assert_allclose(core.components, pca.components_, atol=1e-5)
    np.testing.assert_allclose(core.explained_variance_ratio, pca.explained_variance_ratio_, atol=1e-9)


def test_unsigned_consistency_accepts_a_sum_that_flips_sign():
    # component along x. Rows: a at 60 deg in the xy plane (cos 0.5, the best: the anchor), f at
    # 140 deg in the xy plane, g = (0.3, 0, 0.954). a.f = cos 80 = 0.174 > a.g = 0.15, so f is a's
    # nearest neighbour; neither conflicts with a. The sum a + f points at 100 deg: its cosine is
    # -0.174. Signed: -0.174 < 0.3 * 0.5 refuses f and takes g (sum cosine 0.527). The reference's
    # |cos| rule: 0.174 >= 0.15 accepts f.
    a, f = unit(60, 140)
    rows = np.array([[*a, 0], [*f, 0], [0.3, 0, np.sqrt(1 - 0.09)]], np.float32)
    comp = np.array([[1, 0, 0]], np.float32)
    signed = walk(rows, comp, [2], k=2, delta=0.3)
    unsigned = gradient_walk(rows, comp, np.array([2]), GraphNeighbors(knn_graph(rows, 2)[0]), 0.3,
                             signed_consistency=False)  # fmt: skip
    assert signed.indices.tolist() == [0, 2]
    assert unsigned.indices.tolist() == [0, 1] == reference_walk(rows, comp, [2], 0.3)


def test_unsigned_consistency_anchors_whatever_the_sign():
    # every row points away from the component at 0 deg: cosines -0.423 (115 deg), -0.985 (170),
    # -0.574 (235). Signed: no anchor at all. The reference anchors on the most aligned row, 115 deg;
    # its nearest neighbour 170 deg (55 deg away, no conflict) moves the sum to 142.5 deg,
    # |cos| 0.793 >= 0.8 * 0.423; 235 deg is 120 deg from 115 deg: a conflict, so it is never taken.
    rows = unit(115, 170, -125)
    assert len(walk(rows, unit(0), [3], k=2).indices) == 0
    nbrs = GraphNeighbors(knn_graph(rows, 2)[0])
    unsigned = gradient_walk(rows, unit(0), np.array([3]), nbrs, 0.8, signed_consistency=False)
    assert unsigned.indices.tolist() == [0, 1] == reference_walk(rows, unit(0), [3], 0.8)
    assert unsigned.shortfall.tolist() == [1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [3, 119], ids=["k=3", "k=all"])
def test_reference_mode_reproduces_the_reference_walk(seed, k):
    train, targets = clustered(n=120, d=16, seed=seed)
    train = train * np.linspace(1.5, 0.5, 16)  # uneven so the walk has conflicts to avoid
    normed = l2_normalize(train)[0]
    reference = dict(orient_components=False, signed_consistency=False, conflict_across_components=False)
    args = dict(num_neighbors=k, variance_share=0.8, delta=0.8)
    ours = g2is_arrays(train, targets, 24, **args, **reference)
    core = core_knowledge(targets, variance_share=0.8, orient_components=False)
    expected = reference_walk(normed, core.components, split_budget(core.weights, 24), 0.8, k)
    assert ours.walk.indices.tolist() == expected
    # the switches matter here: our own rules choose other rows
    assert g2is_arrays(train, targets, 24, **args, conflict_across_components=False).walk.indices.tolist() != expected
    if k == 3:
        assert ours.walk.reanchors.sum() > 0  # the fallback scan is exercised too


def test_method_passes_and_records_the_reference_switches(monkeypatch):
    from datasets import Dataset

    from hf_datasel.methods import g2is as g2is_module
    from hf_datasel.methods.base import SelectionContext

    # the rows of the sign-agnostic anchor example, with a target along 0 deg
    def fake_features(ctx, targets, task_column, **feature_args):
        return [unit(115, 170, -125)], [1.0], [unit(0, 0)], ["t"], {"snapshots": [], "compute_dtype": "float32"}

    monkeypatch.setattr(g2is_module, "_load_features", fake_features)
    ctx = SelectionContext(store=None, dataset=Dataset.from_dict({"text": list("abc")}), budget=2)
    with pytest.warns(UserWarning, match="chose 0 of 2 rows"):
        ours = g2is_module.select_g2is(ctx, targets=None, num_neighbors=2)
    assert ours.params["orient_components"] is True and ours.params["signed_consistency"] is True
    ref = g2is_module.select_g2is(
        ctx, targets=None, num_neighbors=2, orient_components=False, signed_consistency=False
    )
    assert ref.indices.tolist() == [0, 1]
    assert ref.params["orient_components"] is False and ref.params["signed_consistency"] is False
