"""DataSelector: raw rows out, clear errors on bad input, and the store must match the dataset."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset, concatenate_datasets

from hf_datasel import DataSelector, RunStore, StoreError, with_row_ids
from hf_datasel.methods.base import check_params
from hf_datasel.methods.s2l import select_s2l
from hf_datasel.selector import parse_budget, resolve_budget
from hf_datasel.store import atomic_path
from tests.test_s2l import store_with_trajectories


@pytest.fixture
def recorded(tmp_path):
    dataset = Dataset.from_dict({"prompt": [f"p{i}" for i in range(20)], "completion": [f"c{i}" for i in range(20)]})
    losses = np.linspace(0.0, 1.9, 20)[:, None] * np.ones((1, 2))
    losses[3] = np.nan
    store_with_trajectories(tmp_path, dataset, losses)
    return dataset, tmp_path


def test_budget_resolution():
    assert resolve_budget(0.2, 100) == 20 and resolve_budget(1.0, 7) == 7 and resolve_budget(0.001, 100) == 1
    assert resolve_budget(5, 10) == 5
    for bad in (0, 11, -1, 0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="out of range"):
            resolve_budget(bad, 10)
    for bad in (True, "10", None):
        with pytest.raises(TypeError):
            resolve_budget(bad, 10)
    with pytest.raises(ValueError, match="give the whole number 5"):
        resolve_budget(5.0, 10)  # the type decides: a float is a fraction, never a row count


def test_budget_text_is_read_by_its_type():
    assert parse_budget("1.0") == 1.0 and isinstance(parse_budget("1.0"), float)
    assert parse_budget(" 1 ") == 1 and isinstance(parse_budget("1"), int)
    assert resolve_budget(parse_budget("1.0"), 96) == 96 and resolve_budget(parse_budget("1"), 96) == 1
    assert resolve_budget(parse_budget("0.25"), 96) == 24 and resolve_budget(parse_budget("500"), 600) == 500
    with pytest.raises(ValueError, match=r"--budget must be .* a whole number >= 1"):
        parse_budget("a fifth")


def test_select_returns_raw_rows_in_order_with_scores(recorded):
    dataset, out = recorded
    selector = DataSelector.from_run(out, dataset=with_row_ids(dataset))
    subset = selector.select("loss", budget=4, which="highest", with_scores=True)
    assert subset.column_names == ["prompt", "completion", "datasel_score"]
    assert subset["prompt"] == ["p16", "p17", "p18", "p19"]  # original order, datasel columns gone
    np.testing.assert_allclose(subset["datasel_score"], np.linspace(0, 1.9, 20)[16:], rtol=1e-6)
    lowest = selector.run("loss", budget=3, which="lowest")
    assert lowest.indices.tolist() == [0, 1, 2] and lowest.info["rows_without_finite_loss"] == 1
    middle = selector.run("loss", budget=3, which="middle")
    assert middle.indices.tolist() == [9, 10, 11]  # 19 finite rows, centred window of 3
    record = selector.last
    assert record.budget == 3 and record.selection.params == {"which": "middle"}
    assert record.store_manifest["model"]["name_or_path"] == "crafted"


def test_random_is_seeded_and_needs_no_store():
    dataset = Dataset.from_dict({"x": list(range(50))})
    selector = DataSelector(dataset)
    a, b = selector.select("random", 0.2, seed=3), selector.select("random", 0.2, seed=3)
    assert a["x"] == b["x"] and len(a) == 10 and a["x"] == sorted(a["x"])
    with pytest.raises(StoreError, match="from_run"):
        selector.select("loss", 0.2)


def test_clear_errors(recorded, tmp_path_factory):
    dataset, out = recorded
    selector = DataSelector.from_run(out, dataset=dataset)
    with pytest.raises(ValueError, match="unknown selection method 'nope'"):
        selector.select("nope", 0.1)
    with pytest.raises(TypeError, match="takes no parameter"):
        selector.select("loss", 0.1, whcih="lowest")
    with pytest.raises(ValueError, match="no per-row scores"):
        selector.select("random", 0.1, with_scores=True)
    with pytest.raises(ValueError, match="19 rows"):
        selector.select("loss", 20)
    with pytest.raises(ValueError, match="empty"):
        DataSelector(dataset.select([]))
    with pytest.raises(StoreError, match="No hf_datasel store"):
        DataSelector.from_run(tmp_path_factory.mktemp("empty"), dataset=dataset)


def test_store_that_does_not_match_the_dataset(recorded):
    dataset, out = recorded
    edited = dataset.map(lambda row, i: {"completion": "changed" if i == 7 else row["completion"]}, with_indices=True)
    with pytest.raises(StoreError, match=r"1 of 20 recorded rows have different content \(first rows: \[7\]\)"):
        DataSelector.from_run(out, dataset=edited)
    with pytest.raises(StoreError, match="at least 20 rows"):
        DataSelector.from_run(out, dataset=dataset.select(range(10)))
    with pytest.raises(StoreError, match="different content"):
        DataSelector.from_run(out, dataset=dataset.shuffle(seed=0))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    store = RunStore(tmp_path)
    store.save_arrays("x", {"a": np.arange(3)})
    with pytest.raises(RuntimeError):
        with atomic_path(store.array_path("x")) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("interrupted")
    assert store.load_arrays("x")["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_with_row_ids_rejects_empty_and_is_idempotent():
    dataset = Dataset.from_dict({"x": [1, 2, 2]})
    stamped = with_row_ids(with_row_ids(dataset))
    assert stamped["datasel_row_id"] == [0, 1, 2]
    hashes = stamped["datasel_row_hash"]
    assert hashes[1] == hashes[2] != hashes[0]  # equal content, equal hash
    with pytest.raises(ValueError, match="empty"):
        with_row_ids(dataset.select([]))


def test_snapshot_only_store_opens_and_loss_methods_say_what_is_missing(tmp_path, tokenizer, pool):
    """A run with SnapshotCallback but no LossRecorderCallback: gradient methods work, loss methods explain."""
    from tests.gradient_store import make_snapshot_store

    store, _ = make_snapshot_store(tmp_path, tokenizer, pool.select(range(16)), peft=False, steps=(2,))
    selector = DataSelector.from_run(tmp_path / "run", dataset=pool)  # the run's output_dir
    assert len(selector.select("random", 4)) == 4
    with pytest.raises(StoreError, match="no 'losses' record"):
        selector.select("loss", 4)


def test_a_dataset_that_differs_in_any_way_is_refused(recorded):
    dataset, out = recorded
    appended = concatenate_datasets([dataset, dataset.select([0])])
    swapped = dataset.select([1, 0, *range(2, 20)])
    removed = dataset.select([i for i in range(20) if i != 5])
    for other, fragment in (
        (appended, "row 20 was never recorded"),
        (swapped, r"2 of 20 recorded rows have different content \(first rows: \[0, 1\]\)"),
        (removed, "recorded on at least 20 rows and this dataset has 19"),
    ):
        with pytest.raises(StoreError, match=fragment) as err:
            DataSelector.from_run(out, dataset=other)
        assert "allow_unrecorded_rows=True" in str(err.value)


def test_allowed_unrecorded_rows_are_never_given_a_recorded_loss(recorded, caplog):
    dataset, out = recorded
    edited = dataset.map(lambda row, i: {"completion": "changed" if i == 7 else row["completion"]}, with_indices=True)
    appended = concatenate_datasets([edited, Dataset.from_dict({"prompt": ["new"], "completion": ["row"]})])
    selector = DataSelector.from_run(out, dataset=appended, allow_unrecorded_rows=True)
    assert "2 row(s) count as never recorded" in caplog.text
    selection = selector.run("loss", budget=18, which="highest")
    chosen = selection.indices
    assert 7 not in chosen and 20 not in chosen and 3 not in chosen  # changed, appended, NaN loss
    assert selection.warnings == [  # on the subset's card too
        "2 of the dataset's 21 rows did not match the recording run's rows and counted as never recorded "
        "(allow_unrecorded_rows=True)"
    ]
    assert DataSelector.from_run(out, dataset=dataset).run("loss", budget=3).warnings == []
    with pytest.raises(ValueError, match="the 18 rows"):
        selector.run("loss", budget=19)
    assert len(selector.select("random", 1.0)) == 21  # methods without records may still pick any row
    shorter = DataSelector.from_run(out, dataset=dataset.select(range(10)), allow_unrecorded_rows=True)
    assert shorter.run("loss", budget=9).indices.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # rows 10.. dropped


def test_method_parameters_are_checked_by_name_and_type():
    check_params("s2l", select_s2l, {"num_clusters": 3, "stratify_by": None, "nan_policy": "zero"})
    for params, fragment in (
        ({"num_clusters": "abc"}, "parameter num_clusters must be a whole number, not 'abc'"),
        ({"num_clusters": True}, "num_clusters must be a whole number"),
        ({"nan_policy": "skip"}, "nan_policy must be one of 'drop', 'raise', 'zero'"),
        ({"stratify_by": 3}, "stratify_by must be text or null"),
    ):
        with pytest.raises(ValueError, match=fragment):
            check_params("s2l", select_s2l, params)
    with pytest.raises(TypeError, match="takes no parameter"):
        check_params("s2l", select_s2l, {"clusters": 3})
