"""LESS: scores from stored features against an independent computation; NaN/zero rows; end to end."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from hf_datasel.featurize import FeatureSet, ProjectorSpec, SpecMismatchError, gradient_features
from hf_datasel.methods import METHODS, SelectionContext
from hf_datasel.methods.less import less_scores, select_less, unlearnt_tasks
from hf_datasel.synthetic import make_pool
from tests.gradient_store import make_snapshot_store


def _independent_scores(train_raw, target_raw, weights, tasks):
    """LESS written out with loops: Σ_t w_t · mean_j cos(train_i, target_j), max over tasks; None when left out."""
    n = train_raw[0].shape[0]
    out = []
    for i in range(n):
        if any(not np.all(np.isfinite(x[i])) or np.linalg.norm(x[i]) == 0 for x in train_raw):
            out.append(None)
            continue
        best = -np.inf
        for task in sorted(set(tasks)):
            total = 0.0
            for x, y, w in zip(train_raw, target_raw, weights):
                cos = []
                for j in np.flatnonzero(tasks == task):
                    if not np.all(np.isfinite(y[j])) or np.linalg.norm(y[j]) == 0:
                        continue
                    cos.append(x[i] @ y[j] / (np.linalg.norm(x[i]) * np.linalg.norm(y[j])))
                total += w * np.mean(cos)
            best = max(best, total)
        out.append(best)
    return out


def _feature_set(raw: np.ndarray, step: int, weight: float, spec: ProjectorSpec, lr: float = 1.0) -> FeatureSet:
    norms = np.linalg.norm(raw, axis=1).astype(np.float32)
    with np.errstate(all="ignore"):
        unit = np.where(norms[:, None] > 0, raw / norms[:, None], 0.0).astype(np.float32)
    unit[~np.isfinite(norms)] = np.nan
    return FeatureSet(Path("."), spec, step, lr, lr, "adam", unit, norms, {}, weight)


def test_less_scores_handle_nan_and_zero_rows_explicitly():
    rng = np.random.default_rng(0)
    spec = ProjectorSpec.create({"w": (6,)}, k=None, dtype="float32")
    train = [rng.normal(size=(10, 6)) for _ in range(2)]
    target = [rng.normal(size=(5, 6)) for _ in range(2)]
    train[0][3] = np.nan  # undefined gradient at one snapshot
    train[1][7] = 0.0  # zero gradient
    target[1][4] = np.nan  # a target row that must drop out of its task's mean
    tasks = np.array(["a", "a", "b", "b", "b"])
    weights = [0.25, 0.75]
    tr = [_feature_set(x, s, w, spec) for x, s, w in zip(train, (1, 2), weights)]
    tg = [_feature_set(y, s, w, spec) for y, s, w in zip(target, (1, 2), weights)]
    score, per_task, names, info = less_scores(tr, tg, tasks)
    # the target row that is NaN at snapshot 2 is left out at *every* snapshot (it has no defined gradient)
    target0 = target[0].copy()
    target0[4] = np.nan
    expected = _independent_scores(train, [target0, target[1]], weights, tasks)
    assert np.isnan(score[3]) and np.isnan(score[7])
    for i, e in enumerate(expected):
        if e is None:
            assert np.isnan(score[i])
        else:
            assert score[i] == pytest.approx(e, rel=1e-6, abs=1e-9)
    assert info["train_rows_nan"] == 1 and info["train_rows_zero_norm"] == 1 and info["target_rows_left_out"] == 1
    assert names == ["a", "b"] and per_task.shape == (10, 2)


def test_less_scores_refuse_mixed_specs():
    a = ProjectorSpec.create({"w": (6,)}, k=None)
    b = ProjectorSpec.create({"w": (6,)}, k=4, seed=0)
    x = np.ones((3, 6))
    with pytest.raises(SpecMismatchError):
        less_scores([_feature_set(x, 1, 1.0, a)], [_feature_set(np.ones((2, 4)), 1, 1.0, b)], np.zeros(2))


@pytest.fixture(scope="module")
def less_store(tmp_path_factory, tokenizer):
    pool = make_pool(24, noise=0.2, seed=11)
    pool = pool.add_item(
        {"prompt": "copy " + "abcdefgh" * 8 + "=", "completion": "ab", "task": "copy", "is_noisy": False}
    )
    store, _ = make_snapshot_store(tmp_path_factory.mktemp("less"), tokenizer, pool)
    targets = make_pool(8, noise=0.0, seed=12, tasks=("add", "reverse"))
    return store, pool, targets


def test_select_less_equals_independent_computation_from_exact_features(less_store):
    store, pool, targets = less_store
    ctx = SelectionContext(store=store, dataset=pool, budget=5)
    sel = select_less(ctx, targets, k=None, feature_dtype="float32", max_length=32, batch_size=8)
    common = dict(k=None, dtype="float32", max_length=32, progress=False)
    train = gradient_features(store, pool, preconditioner="adam", **common)
    target = gradient_features(store, targets, preconditioner="none", **common)
    lr = np.array([t.lr_mean for t in train])
    expected = _independent_scores(
        [t.raw() for t in train], [t.raw() for t in target], lr / lr.sum(), np.asarray(targets["task"])
    )
    assert expected[-1] is None  # the truncated row: no label tokens, left out
    assert sel.info["train_rows_nan"] == 1
    finite = np.array([-np.inf if e is None else e for e in expected])
    top = np.argsort(-finite, kind="stable")[:5]
    np.testing.assert_array_equal(sel.indices, np.sort(top))
    np.testing.assert_allclose(sel.scores, finite[sel.indices], rtol=1e-6)
    assert sel.params["steps"] == [2, 4] and set(sel.info["tasks"]) == {"add", "reverse"}


def test_less_reports_the_models_loss_on_the_targets_at_every_snapshot(less_store, tokenizer):
    """`info["snapshots"]` carries the snapshot model's mean loss on each task's targets and on the pool,
    as the model itself computes it row by row."""
    import torch

    from hf_datasel.data import pad_batch, tokenize_rows
    from hf_datasel.featurize import load_model, load_snapshot
    from hf_datasel.featurize.snapshots import assign_snapshot

    store, pool, targets = less_store
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select_less(SelectionContext(store=store, dataset=pool, budget=5), targets, k=64, max_length=32)
    warned = [str(w.message) for w in caught if "did not fall" in str(w.message)]
    model = load_model(store).eval()
    per_snapshot, pool_losses = [], []
    # the pool's last row is truncated to no label token: no loss
    target_rows, pool_rows = tokenize_rows(targets, tokenizer, 32), tokenize_rows(pool, tokenizer, 32)[:-1]

    def loss(row):
        with torch.no_grad():
            return model(**pad_batch([row], tokenizer.pad_token_id)).loss.item()

    tasks = np.asarray(targets["task"])
    for snap in sel.info["snapshots"]:
        assign_snapshot(model, load_snapshot(store, snap["step"]))
        target_loss = np.array([loss(r) for r in target_rows])
        expected = {task: target_loss[tasks == task].mean() for task in ("add", "reverse")}
        assert snap["target_loss"] == pytest.approx(expected, rel=1e-5)
        pool_losses.append(np.mean([loss(r) for r in pool_rows]))
        assert snap["train_loss"] == pytest.approx(pool_losses[-1], rel=1e-5)
        per_snapshot.append(expected)
    unlearnt = [t for t in ("add", "reverse") if not per_snapshot[-1][t] < min(per_snapshot[0][t], pool_losses[-1])]
    assert unlearnt_tasks(sel.info) == unlearnt
    assert len(warned) == bool(unlearnt) and all(str(unlearnt) in w for w in warned)
    assert sel.warnings == warned  # kept with the selection: its dataset card lists them


def test_tasks_the_model_has_not_learnt_are_named():
    """A task is named when its target loss did not fall, or ends at or above the pool's loss."""
    first = {"train_loss": 1.2, "target_loss": {"a": 2.0, "b": 1.0, "c": 1.5}}
    last = {"train_loss": 0.8, "target_loss": {"a": 0.5, "b": 1.0, "c": 0.9}}
    assert unlearnt_tasks({"snapshots": [first, last]}) == ["b", "c"]  # b: no fall; c: fell, but above the pool
    assert unlearnt_tasks({"snapshots": [first]}) == ["a", "c"]  # one snapshot: only the pool comparison
    assert unlearnt_tasks({"snapshots": [last]}) == ["b", "c"]
    assert unlearnt_tasks({"snapshots": [{"step": 1}, {"step": 2}]}) == []  # a cache without losses
    nan = {"train_loss": 0.8, "target_loss": {"a": float("nan")}}
    assert unlearnt_tasks({"snapshots": [first, nan]}) == ["a"]


def test_select_less_refuses_budget_beyond_defined_rows(less_store):
    store, pool, targets = less_store
    ctx = SelectionContext(store=store, dataset=pool, budget=len(pool))
    with pytest.raises(ValueError, match="defined"):
        select_less(ctx, targets, k=64, max_length=32)


def test_less_is_registered():
    assert METHODS["less"] is select_less


def test_targets_without_task_column_are_one_task(less_store):
    store, pool, targets = less_store
    ctx = SelectionContext(store=store, dataset=pool, budget=3)
    plain = Dataset.from_dict({"prompt": targets["prompt"], "completion": targets["completion"]})
    sel = select_less(ctx, plain, k=64, max_length=32)
    assert len(sel.indices) == 3 and sel.params["task_column"] is None
