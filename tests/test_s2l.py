"""S2L on crafted trajectories whose clusters and quotas are known in advance.

Hand-worked quotas follow the reference code (`schedules/s2l.py` of the S2L authors): clusters of
at most 2 rows sit out the balanced pass, sources get equal shares smallest first.
"""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from hf_datasel import DataSelector, RunStore
from hf_datasel.methods.s2l import balanced_sample, cluster_trajectories, equal_quotas, proportional_quotas
from hf_datasel.rows import row_hashes


def store_with_trajectories(path, dataset: Dataset, trajectories: np.ndarray, rows=None) -> RunStore:
    """A run store holding `trajectories` (rows x T) as checkpoint sweeps, for rows `rows`."""
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    store = RunStore(path)
    store.write_manifest({"model": {"name_or_path": "crafted"}, "recorded": {}})
    store.save_arrays("rows", {"row_id": rows, "row_hash": row_hashes(dataset)[rows]})
    steps = np.arange(1, trajectories.shape[1] + 1)
    store.save_arrays("sweep", {"steps": steps, "row_id": rows, "loss": trajectories.T.astype(np.float32)})
    store.save_arrays("losses", {"row_id": rows, "step": np.zeros(len(rows), np.int64), "loss": trajectories[:, -1]})
    return store


def three_clusters(sizes=(4, 10, 30), seed=0):
    """Trajectories around three well-separated centres; cluster c has sizes[c] rows."""
    rng = np.random.default_rng(seed)
    centres = np.array([[5.0, 4.0, 3.0], [3.0, 1.0, 0.2], [2.0, 2.0, 2.0]])
    labels = np.repeat(np.arange(3), sizes)
    traj = centres[labels] + rng.normal(scale=0.01, size=(len(labels), 3))
    dataset = Dataset.from_dict({"text": [f"row {i}" for i in range(len(labels))], "cluster": labels.tolist()})
    return dataset, traj, labels


def test_balanced_sample_quotas_by_hand():
    labels = np.array([0] * 3 + [1] * 5 + [2] * 20)
    picked = balanced_sample(labels, budget=12, rng=np.random.default_rng(0))
    # smallest first: cluster 0 quota 12//3=4 >= 3 -> all 3; cluster 1 quota 9//2=4 of 5 -> 4 sampled;
    # cluster 2 quota 5//1=5 of 20 -> 5 sampled
    counts = np.bincount(labels[picked], minlength=3)
    assert counts.tolist() == [3, 4, 5]
    assert len(np.unique(picked)) == 12


def test_tiny_clusters_only_fill_the_remainder_by_hand():
    labels = np.array([0] + [1] * 2 + [2] * 5 + [3] * 20)
    rng = np.random.default_rng(0)
    # reference: clusters 0 and 1 (<= 2 rows) sit out; cluster 2 quota 12//2=6 -> all 5; cluster 3 quota 7//1=7
    assert np.bincount(labels[balanced_sample(labels, 12, rng)], minlength=4).tolist() == [0, 0, 5, 7]
    # budget 26: clusters 2 and 3 whole (25 rows), the 1 left is drawn from the 3 rows of the tiny clusters
    counts = np.bincount(labels[balanced_sample(labels, 26, rng)], minlength=4)
    assert counts[2:].tolist() == [5, 20] and counts[:2].sum() == 1
    # tiny_cluster=0 puts every cluster in the pass: quotas 12//4=3 -> 1, 11//3=3 -> 2, 9//2=4 of 5, 5//1=5
    assert np.bincount(labels[balanced_sample(labels, 12, rng, tiny_cluster=0)]).tolist() == [1, 2, 4, 5]


def test_balanced_sample_ties_and_exact_budget():
    labels = np.array([1, 1, 1, 0, 0, 0, 2, 2, 2])
    picked = balanced_sample(labels, budget=4, rng=np.random.default_rng(1))
    # equal sizes, visited 0, 1, 2: quotas 4//3=1, 3//2=1, 2//1=2
    assert np.bincount(labels[picked], minlength=3).tolist() == [1, 1, 2]


def test_s2l_recovers_crafted_clusters(tmp_path):
    dataset, traj, labels = three_clusters()
    store_with_trajectories(tmp_path, dataset, traj)
    selector = DataSelector.from_run(tmp_path, dataset=dataset)
    subset = selector.select("s2l", budget=15, num_clusters=3, seed=0)
    # quotas: 15//3=5 -> all 4 of the small cluster; 11//2=5 of 10; 6//1=6 of 30
    assert np.bincount(subset["cluster"], minlength=3).tolist() == [4, 5, 6]
    assert selector.last.selection.info["clusters"] == 3
    found = cluster_trajectories(traj, 3, seed=0)
    assert len({(a, b) for a, b in zip(found, labels)}) == 3  # the k-means partition is the crafted one


def test_s2l_is_deterministic_under_seed(tmp_path):
    dataset, traj, _ = three_clusters()
    store_with_trajectories(tmp_path, dataset, traj)
    selector = DataSelector.from_run(tmp_path, dataset=dataset)
    a = selector.run("s2l", 15, num_clusters=3, seed=7).indices
    b = selector.run("s2l", 15, num_clusters=3, seed=7).indices
    c = selector.run("s2l", 15, num_clusters=3, seed=8).indices
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def outlier_pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """12 groups of 100-400 noisy trajectories around decreasing loss curves, plus 30 far, scattered outliers."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(100, 400, size=12)
    centres = rng.uniform(0.5, 3.0, size=(12, 8)).cumsum(axis=1)[:, ::-1] / 4
    groups = np.repeat(np.arange(12), sizes)
    traj = np.vstack([centres[groups] + rng.normal(scale=0.15, size=(len(groups), 8)), rng.uniform(8, 30, (30, 8))])
    return traj, np.arange(len(traj)) >= len(groups)


def test_s2l_takes_few_far_outliers(tmp_path):
    """k-means isolates each outlier in a cluster of its own; the balanced pass must not take them all."""
    traj, outlier = outlier_pool()
    dataset = Dataset.from_dict({"text": [f"row {i}" for i in range(len(traj))]})
    store_with_trajectories(tmp_path, dataset, traj)
    selector = DataSelector.from_run(tmp_path, dataset=dataset)
    for budget in (250, 500, 1000):
        taken = outlier[selector.run("s2l", budget, seed=0).indices].sum()
        assert taken <= 3, (budget, taken)
    # the pass that takes small clusters whole (the old default) takes every one of them
    assert outlier[selector.run("s2l", 250, tiny_cluster=0).indices].sum() == 30


def test_equal_and_proportional_quotas_by_hand():
    sizes = np.array([50, 10, 200, 30])
    # smallest first: 10 -> min(10, 100//4=25); 30 -> min(30, 90//3); 50 -> min(50, 60//2); 200 -> 30//1
    assert equal_quotas(sizes, 100).tolist() == [30, 10, 30, 30]
    # 100 * sizes / 290 = 17.24, 3.45, 68.97, 10.34 -> floors 17, 3, 68, 10; the 2 left go to .97 and .45
    assert proportional_quotas(sizes, 100).tolist() == [17, 4, 69, 10]
    assert equal_quotas(np.array([5, 5, 5]), 7).tolist() == [2, 2, 3]  # ties in order: 7//3, 5//2, 3//1


def test_s2l_stratifies_equally_or_proportionally(tmp_path):
    dataset, traj, _ = three_clusters(sizes=(10, 10, 20))
    source = ["a"] * 6 + ["b"] * 10 + ["c"] * 24
    dataset = dataset.add_column("source", source)
    store_with_trajectories(tmp_path, dataset, traj)
    selector = DataSelector.from_run(tmp_path, dataset=dataset)
    # equal (default): a 18//3=6 -> all 6, taken whole; b 12//2=6 of 10; c 6//1=6 of 24
    subset = selector.select("s2l", budget=18, num_clusters=3, stratify_by="source")
    assert [subset["source"].count(s) for s in "abc"] == [6, 6, 6]
    assert selector.last.selection.info["rows_per_source"] == {"a": 6, "b": 6, "c": 6}
    # proportional: 18 * (6, 10, 24) / 40 = 2.7, 4.5, 10.8 -> 2, 4, 10, the 2 left to .8 (c) and .7 (a)
    subset = selector.select("s2l", budget=18, num_clusters=3, stratify_by="source", stratify_split="proportional")
    assert [subset["source"].count(s) for s in "abc"] == [3, 4, 11]


def test_s2l_nan_policy_zero_is_the_reference_arithmetic(tmp_path):
    """The reference sets NaN losses to 0: row 0's trajectory becomes (0, 0, 0), a cluster of its own."""
    dataset, traj, labels = three_clusters(sizes=(4, 10, 30))
    traj[0, 1] = np.nan
    store_with_trajectories(tmp_path, dataset, traj)
    selector = DataSelector.from_run(tmp_path, dataset=dataset)
    with pytest.raises(ValueError, match="44 rows"):
        selector.run("s2l", budget=44, num_clusters=4)  # "drop" leaves row 0 out
    # K=4: clusters of 1 (row 0), 3, 10, 30 rows; budget 43 = the three big ones whole, row 0 sits out
    picked = selector.run("s2l", budget=43, num_clusters=4, nan_policy="zero").indices
    assert 0 not in picked and len(picked) == 43
    # budget 44: the one row left over is the remainder, filled from the tiny cluster
    assert 0 in selector.run("s2l", budget=44, num_clusters=4, nan_policy="zero").indices


def test_kmeans_random_init_finds_the_crafted_clusters():
    _, traj, labels = three_clusters()
    for seed in (0, 1):
        found = cluster_trajectories(traj, 3, seed=seed, init="random")
        assert len({(a, b) for a, b in zip(found, labels)}) == 3


def test_s2l_clamps_k_and_stratifies(tmp_path):
    dataset, traj, labels = three_clusters(sizes=(6, 6, 8))
    source = np.where(np.arange(20) % 2 == 0, "a", "b")
    dataset = dataset.add_column("source", source.tolist())
    store_with_trajectories(tmp_path, dataset, traj)
    selector = DataSelector.from_run(tmp_path, dataset=dataset)
    subset = selector.select("s2l", budget=10, num_clusters=100, stratify_by="source")
    assert sorted(subset["source"]) == ["a"] * 5 + ["b"] * 5  # 10 and 10 rows -> 5 and 5
    assert set(selector.last.selection.info["clusters"].values()) <= {10}  # K clamped to the rows present
    with pytest.raises(ValueError, match="not a column"):
        selector.select("s2l", budget=10, stratify_by="nope")


def test_s2l_nan_rows_are_left_out_or_refused(tmp_path):
    dataset, traj, _ = three_clusters()
    traj[[0, 5]] = np.nan
    store_with_trajectories(tmp_path, dataset, traj)
    selector = DataSelector.from_run(tmp_path, dataset=dataset)
    picked = selector.run("s2l", budget=42, num_clusters=3).indices
    assert 0 not in picked and 5 not in picked and len(picked) == 42
    assert selector.last.selection.info["rows_with_nonfinite_loss"] == 2
    with pytest.raises(ValueError, match="non-finite"):
        selector.run("s2l", budget=10, nan_policy="raise")
    with pytest.raises(ValueError, match="42 rows"):
        selector.run("s2l", budget=43)


def test_s2l_uses_training_records_without_sweeps(tmp_path):
    """Without sweeps the trajectory is the row's loss each time it was trained on (one per epoch)."""
    dataset = Dataset.from_dict({"text": [str(i) for i in range(4)]})
    store = RunStore(tmp_path)
    store.write_manifest({"recorded": {}})
    store.save_arrays("rows", {"row_id": np.arange(4), "row_hash": row_hashes(dataset)})
    store.save_arrays(
        "losses",
        {
            "row_id": np.array([2, 0, 1, 3, 0, 1, 2]),
            "step": np.array([0, 0, 1, 1, 5, 5, 6]),
            "loss": np.array([2.0, 1.0, 3.0, 9.0, 0.5, 1.5, 1.0], np.float32),
        },
    )
    row_id, traj, source = store.trajectories()
    assert source == "training"
    np.testing.assert_array_equal(row_id, [0, 1, 2, 3])
    np.testing.assert_array_equal(traj, [[1.0, 0.5], [3.0, 1.5], [2.0, 1.0], [9.0, np.nan]])
    picked = DataSelector.from_run(tmp_path, dataset=dataset).run("s2l", budget=3).indices
    assert picked.tolist() == [0, 1, 2]  # row 3 has an incomplete trajectory
