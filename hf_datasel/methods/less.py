"""LESS: pick training rows whose (Adam-preconditioned) gradients align with the target tasks' gradients.

For each snapshot t with learning-rate weight w_t (normalized to sum 1), a training row's score
for task j is `w_t ×` the mean cosine between its Adam-preconditioned gradient feature and the
plain gradient features of task j's target rows; the row's score is the max over tasks of the
sum over snapshots. The `budget` highest-scoring rows are selected.

Rows whose gradient is undefined (NaN: no label tokens, non-finite loss) or zero at any snapshot
have no cosine; they are left out and counted in `info`, never given a made-up score. Target
rows likewise drop out of their task's mean.

`info["snapshots"]` also gives the model's mean loss on the training rows and on each task's target rows
at every snapshot; a task the model has likely not learnt (`unlearnt_tasks`) is warned about.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from datasets import Dataset

from ..featurize import FeatureSet, check_same_space, gradient_features
from .base import Selection, SelectionContext, function_name


def less_scores(
    train: Sequence[FeatureSet], targets: Sequence[FeatureSet], target_tasks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list, dict]:
    """(score (N,), per-task scores (N, T), task names, info) from per-snapshot feature sets.

    `train[i]` and `targets[i]` are the same snapshot; weights are `train[i].weight`. Rows left out
    (undefined or zero gradient at some snapshot) have NaN scores.
    """
    if len(train) != len(targets) or not train:
        raise ValueError("LESS needs train and target features at the same, non-empty list of snapshots")
    tasks = sorted(set(target_tasks.tolist()), key=str)
    n = train[0].num_rows
    nan_rows = np.zeros(n, bool)
    zero_rows = np.zeros(n, bool)
    target_ok = np.ones(len(target_tasks), bool)
    for tr, tg in zip(train, targets):
        if tr.step != tg.step:
            raise ValueError(f"train features of step {tr.step} paired with target features of step {tg.step}")
        check_same_space(tr, tg)
        nan_rows |= ~np.isfinite(tr.norms)
        zero_rows |= tr.norms == 0
        target_ok &= np.isfinite(tg.norms) & (tg.norms > 0)
    zero_rows &= ~nan_rows
    left_out = nan_rows | zero_rows
    per_task = np.full((n, len(tasks)), np.nan, np.float64)
    members = {task: np.flatnonzero((target_tasks == task) & target_ok) for task in tasks}
    target_counts = {str(task): int(len(m)) for task, m in members.items()}
    usable_tasks = [task for task in tasks if len(members[task])]
    columns = [tasks.index(task) for task in usable_tasks]
    if usable_tasks:
        per_task[:, columns] = 0.0
    for tr, tg in zip(train, targets):
        if not usable_tasks:
            break
        # mean cosine to a task = <unit train row, mean of the task's unit target rows>
        centers = np.stack([np.asarray(tg.unit[members[t]], np.float64).mean(axis=0) for t in usable_tasks], axis=1)
        chunk = max(256, (1 << 27) // (8 * centers.shape[0]))
        for start in range(0, n, chunk):
            block = np.asarray(tr.unit[start : start + chunk], np.float64)
            per_task[start : start + chunk, columns] += tr.weight * (block @ centers)
    if not usable_tasks:
        raise ValueError("LESS: no target row has a defined, non-zero gradient; nothing to align with.")
    per_task[left_out] = np.nan
    with np.errstate(all="ignore"):
        usable = np.isfinite(per_task).any(axis=0)
        score = np.where(left_out, np.nan, np.max(per_task[:, usable], axis=1))
    info = {
        "train_rows_nan": int(nan_rows.sum()),
        "train_rows_zero_norm": int(zero_rows.sum()),
        "target_rows_left_out": int((~target_ok).sum()),
        "target_rows_per_task": target_counts,
        "tasks_without_targets": [str(t) for t in tasks if t not in usable_tasks],
        "snapshots": [
            {"step": tr.step, "weight": tr.weight, "lr_mean": tr.lr_mean, **_losses(tr, tg, members)}
            for tr, tg in zip(train, targets)
        ],
    }
    return score, per_task, tasks, info


def _losses(train: FeatureSet, target: FeatureSet, members: dict) -> dict:
    """The model's mean loss at a snapshot on the training rows and on each task's target rows (when stored).

    They say whether the warmup learnt the target tasks (`unlearnt_tasks`): a gradient score cannot tell right
    answers from wrong ones in a task the model has not learnt.
    """
    if train.loss is None or target.loss is None:  # features cached before losses were stored
        return {}
    with np.errstate(all="ignore"):
        return {
            "train_loss": float(np.nanmean(train.loss)),
            "target_loss": {str(t): float(np.nanmean(target.loss[m])) for t, m in members.items() if len(m)},
        }


def unlearnt_tasks(info: dict) -> list[str]:
    """Target tasks the recorded model has likely not learnt: their mean loss did not fall from the first to the
    last snapshot, or it ends at or above the model's mean loss on the pool it trained on.

    On the quality bench the second sign tells the pools where LESS filters the target's wrong answers (final
    target loss 0.3-0.9x the pool's) from those where it cannot (1.4x, though it fell by half).
    """
    snaps = [s for s in info["snapshots"] if "target_loss" in s]
    if not snaps:
        return []
    first, last, pool = snaps[0]["target_loss"], snaps[-1]["target_loss"], snaps[-1]["train_loss"]
    fell = {t: len(snaps) < 2 or loss < first.get(t, np.nan) for t, loss in last.items()}
    return [t for t, loss in last.items() if not (fell[t] and loss < pool)]


def select_less(
    ctx: SelectionContext,
    targets: Dataset,
    task_column: str | None = "task",
    k: int | None = 8192,
    projection_seed: int = 0,
    projection: Literal["tensor", "sparse", "rademacher", "gaussian"] = "tensor",
    adam_form: Literal["adam", "adam_reference", "adam_factored"] = "adam",
    feature_dtype: Literal["float16", "float32"] = "float16",
    steps: Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    model=None,
    tokenizer=None,
    formatting_func: Callable[[dict], str] | None = None,
) -> Selection:
    """The `budget` training rows with the highest LESS score against `targets`.

    Args:
        targets: target (validation) rows, with `prompt`/`completion` (or `text`); grouped into tasks
            by `task_column` when the dataset has it (one task otherwise).
        k, projection_seed, projection: the feature projection (`k=None`: exact gradients); "tensor" (default)
            is a CountSketch that large weight matrices are sketched from their factors with.
        feature_dtype: storage dtype of the unit-normalized features.
        adam_form: "adam" (bias-corrected, ε outside the root), "adam_reference" (LESS code's form), or
            "adam_factored" (Adafactor-style second moments: an approximation that lets full-model
            gradients be sketched without forming them; see `featurize.AdamConstants.factored_scale`).
        steps: snapshot steps to use (default: all snapshots of the run).
        batch_size, max_length: featurization batching and truncation (default: the recorded trainer's).
        model, tokenizer: overrides of the model/tokenizer rebuilt from the store.
        formatting_func: the recorded run's `formatting_func`, when it used one (targets are prepared with it).

    Features are computed when missing and cached in the store, so a second call is cheap.
    """
    store = ctx.require_store("less")
    if not isinstance(targets, Dataset) or len(targets) == 0:
        raise ValueError("less: targets must be a non-empty datasets.Dataset")
    common = {
        "k": k,
        "seed": projection_seed,
        "kind": projection,
        "dtype": feature_dtype,
        "steps": steps,
        "batch_size": batch_size,
        "max_length": max_length,
        "model": model,
        "tokenizer": tokenizer,
        "formatting_func": formatting_func,
    }
    train = gradient_features(store, ctx.dataset, preconditioner=adam_form, **common)
    target = gradient_features(store, targets, preconditioner="none", **common)
    has_tasks = task_column is not None and task_column in targets.column_names
    tasks = np.asarray(targets[task_column]) if has_tasks else np.zeros(len(targets), np.int64)
    score, per_task, task_names, info = less_scores(train, target, tasks)
    candidates = np.flatnonzero(np.isfinite(score))
    ctx.check_budget(len(candidates), "less", "rows with a defined, non-zero gradient at every snapshot")
    order = candidates[np.argsort(-score[candidates], kind="stable")]
    chosen = order[: ctx.budget]
    best = np.asarray(task_names, dtype=object)[np.nanargmax(per_task[chosen], axis=1)] if len(chosen) else []
    info["tasks"] = [str(t) for t in task_names] if has_tasks else []
    info["selected_per_best_task"] = {str(t): int(np.sum(best == t)) for t in task_names} if has_tasks else {}
    info["spec"] = train[0].spec.to_dict() | {"param_names": len(train[0].spec.param_names)}
    caveats = []
    unlearnt = unlearnt_tasks(info)
    if unlearnt:
        caveats.append(
            f"less: the recorded model's loss on the target rows of {unlearnt} did not fall over the run, or ends "
            "at or above its loss on the pool (Selection.info['snapshots']): it has likely not learnt those tasks, "
            "so their gradients may not tell right answers from wrong ones; warm up longer or on rows closer to "
            "the targets"
        )
    for caveat in caveats:
        warnings.warn(caveat, stacklevel=2)
    return Selection(
        indices=chosen,
        scores=score[chosen],
        method="less",
        params={
            "task_column": task_column if has_tasks else None,
            "num_targets": len(targets),
            "k": k,
            "projection_seed": projection_seed,
            "projection": projection,
            "adam_form": adam_form,
            "feature_dtype": feature_dtype,
            "steps": [t.step for t in train],
            "compute_dtype": train[0].meta.get("compute_dtype", "float32"),  # the model's precision (`model=`)
            "batch_size": batch_size,
            "max_length": max_length,
            "formatting_func": function_name(formatting_func),
        },
        info=info,
        warnings=caveats,
    )
