"""S2L on crafted trajectories whose clusters and quotas are known in advance."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from hf_datasel import DataSelector, RunStore
from hf_datasel.methods.s2l import balanced_sample, cluster_trajectories
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
    labels = np.array([0] * 2 + [1] * 5 + [2] * 20)
    picked = balanced_sample(labels, budget=12, rng=np.random.default_rng(0))
    # smallest first: cluster 0 quota 12//3=4 >= 2 -> both; cluster 1 quota 10//2=5 -> all 5;
    # cluster 2 quota 5//1=5 of 20 -> 5 sampled
    counts = np.bincount(labels[picked], minlength=3)
    assert counts.tolist() == [2, 5, 5]
    assert len(np.unique(picked)) == 12


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


def test_s2l_clamps_k_and_stratifies(tmp_path):
    dataset, traj, labels = three_clusters(sizes=(6, 6, 8))
    source = np.where(np.arange(20) % 2 == 0, "a", "b")
    dataset = dataset.add_column("source", source.tolist())
    store_with_trajectories(tmp_path, dataset, traj)
    selector = DataSelector.from_run(tmp_path, dataset=dataset)
    subset = selector.select("s2l", budget=10, num_clusters=100, stratify_by="source")
    assert sorted(subset["source"]) == ["a"] * 5 + ["b"] * 5  # proportional: 10 and 10 rows -> 5 and 5
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
