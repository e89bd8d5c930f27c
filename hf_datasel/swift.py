"""Swift Study: will data made with a strategy (e.g. chain-of-thought answers) help, judged without retraining.

A handful of *probe* examples written with each strategy are scored against *evaluation*
examples at every snapshot of a recorded run with the relative influence score of seed
`000_…`:

    RelInf(p, e; θt) = ⟨g(p), g(e)⟩ / ⟨g(e), g(e)⟩,   g = plain gradient of the trainable weights

i.e. how much a step on `p` lowers the loss of `e`, relative to a step on `e` itself. Pairs
of the same task give the *in-task* score, pairs of different tasks the *cross-task* score
(generalization). An evaluation example the model has already learned has a near-zero
gradient and would make RelInf explode; such examples are left out (and counted) at the
snapshots where their ⟨g(e), g(e)⟩ falls below `near_zero ×` the median over evaluation
examples.

>>> report = swift_study("runs/warmup", probes=probe_ds, evals=eval_ds)
>>> report.table            # strategy × step: in-task / cross-task mean, std, sem, pairs
>>> report.plot("swift.png")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from datasets import Dataset

from .featurize import check_same_space, gradient_features
from .store import RunStore

DEFAULT_NEAR_ZERO = 1e-3
Spread = Literal["pairs", "probes"]
TABLE_COLUMNS = (
    "step",
    "strategy",
    "in_task_mean",
    "in_task_std",
    "in_task_sem",
    "in_task_pairs",
    "cross_task_mean",
    "cross_task_std",
    "cross_task_sem",
    "cross_task_pairs",
    "excluded_evals",
    "excluded_pairs",
)


# -- scores -------------------------------------------------------------------------------
def relinf(probe_grads: torch.Tensor, eval_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RelInf of every (probe, eval) pair at one snapshot, and each eval's ⟨g(e), g(e)⟩.

    `probe_grads` is (P, D), `eval_grads` (E, D): gradients (or their projections) as rows.
    Returns `(scores (P, E), eval_norm2 (E,))` in float64. Scores are divided as they are;
    near-zero denominators are dealt with by `aggregate_relinf`, which sees all of them.
    """
    if probe_grads.ndim != 2 or eval_grads.ndim != 2 or probe_grads.shape[1] != eval_grads.shape[1]:
        raise ValueError(
            f"Expected (P, D) probe and (E, D) eval gradients of the same D; got {tuple(probe_grads.shape)} "
            f"and {tuple(eval_grads.shape)}."
        )
    p, e = probe_grads.double(), eval_grads.double()
    norm2 = (e * e).sum(dim=1)
    return (p @ e.T) / norm2, norm2


def near_zero_evals(eval_norm2: np.ndarray, near_zero: float = DEFAULT_NEAR_ZERO) -> np.ndarray:
    """Mask (T, E) of evals left out: ⟨g(e), g(e)⟩ ≤ `near_zero` × that snapshot's median, zero, or not finite."""
    eval_norm2 = np.asarray(eval_norm2, np.float64)
    if eval_norm2.ndim != 2:
        raise ValueError(f"eval_norm2 must be (snapshots, evals), got shape {eval_norm2.shape}")
    if not near_zero >= 0:
        raise ValueError(f"near_zero must be a non-negative fraction of the median, got {near_zero}")
    finite = np.isfinite(eval_norm2)
    with np.errstate(all="ignore"):
        median = np.array([np.median(row[ok]) if ok.any() else np.nan for row, ok in zip(eval_norm2, finite)])
        small = eval_norm2 <= near_zero * median[:, None]
    return ~finite | (eval_norm2 <= 0) | small


def _stats(scores: np.ndarray, keep: np.ndarray, spread: Spread) -> tuple[float, float, float, int]:
    """(mean over kept pairs, std, sem, pairs) of a (probes, evals) block; std/sem over pairs or per-probe means."""
    values = scores[keep]
    n = int(values.size)
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    mean = float(values.mean())
    if spread == "probes":
        counts = keep.sum(axis=1)
        values = np.where(keep, scores, 0.0).sum(axis=1)[counts > 0] / counts[counts > 0]
    if values.size < 2:
        return mean, np.nan, np.nan, n
    std = float(values.std(ddof=1))
    return mean, std, std / np.sqrt(values.size), n


def aggregate_relinf(
    scores: np.ndarray,
    eval_norm2: np.ndarray,
    probe_tasks: Sequence[str],
    probe_strategies: Sequence[str],
    eval_tasks: Sequence[str],
    steps: Sequence[int],
    near_zero: float = DEFAULT_NEAR_ZERO,
    spread: Spread = "pairs",
) -> pd.DataFrame:
    """In-task and cross-task RelInf per strategy and snapshot: mean over pairs, std (ddof=1), sem, pair count.

    `scores` is (T, P, E), `eval_norm2` (T, E). Pairs whose eval is near zero at that snapshot
    (see `near_zero_evals`) or whose score is not finite are left out; `excluded_evals` counts
    the evals dropped at the snapshot, `excluded_pairs` the strategy's pairs dropped.

    `spread="pairs"`: std and sem = std/√pairs over the pairs. Pairs share probes and evals, so
    this sem understates the uncertainty; `spread="probes"` takes std and sem = std/√probes over
    each probe's mean score instead (probes are the independent draws of a strategy).
    """
    if spread not in ("pairs", "probes"):
        raise ValueError(f"spread must be 'pairs' or 'probes', not {spread!r}")
    scores, eval_norm2 = np.asarray(scores, np.float64), np.asarray(eval_norm2, np.float64)
    probe_tasks, probe_strategies = np.asarray(probe_tasks, str), np.asarray(probe_strategies, str)
    eval_tasks, steps = np.asarray(eval_tasks, str), np.asarray(steps, np.int64)
    T, P, E = scores.shape
    if eval_norm2.shape != (T, E) or len(probe_tasks) != P or len(probe_strategies) != P:
        raise ValueError("scores (T, P, E), eval_norm2 (T, E) and the probe/eval labels do not agree in size.")
    if len(eval_tasks) != E or len(steps) != T:
        raise ValueError("scores (T, P, E), eval_tasks (E,) and steps (T,) do not agree in size.")
    dropped = near_zero_evals(eval_norm2, near_zero)  # (T, E)
    same_task = probe_tasks[:, None] == eval_tasks[None, :]  # (P, E)
    rows = []
    for t in range(T):
        valid = ~dropped[t][None, :] & np.isfinite(scores[t])
        for strategy in dict.fromkeys(probe_strategies):  # first-seen order
            mine = probe_strategies == strategy
            s, ok, same = scores[t][mine], valid[mine], same_task[mine]
            in_stats = _stats(s, ok & same, spread)
            cross_stats = _stats(s, ok & ~same, spread)
            rows.append(
                (int(steps[t]), str(strategy), *in_stats, *cross_stats, int(dropped[t].sum()), int((~ok).sum()))
            )
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


# -- the report -----------------------------------------------------------------------------
class SwiftReport:
    """The outcome of a Swift Study: raw RelInf scores across snapshots, the summary table, and a plot.

    Attributes:
        table: one row per (step, strategy): in-task and cross-task mean/std/sem/pairs, and
            the near-zero exclusion counts (see `aggregate_relinf`).
        scores: (T, P, E) RelInf per snapshot, probe, eval; `eval_norm2`: (T, E) ⟨g(e), g(e)⟩.
        excluded: (T, E) evals left out as already learned at each snapshot.
    """

    def __init__(
        self,
        steps: Sequence[int],
        scores: np.ndarray,
        eval_norm2: np.ndarray,
        probe_tasks: Sequence[str],
        probe_strategies: Sequence[str],
        eval_tasks: Sequence[str],
        near_zero: float = DEFAULT_NEAR_ZERO,
        info: dict[str, Any] | None = None,
        spread: Spread = "pairs",
    ):
        self.steps = np.asarray(steps, np.int64)
        self.scores = np.asarray(scores, np.float64)
        self.eval_norm2 = np.asarray(eval_norm2, np.float64)
        self.probe_tasks = [str(x) for x in probe_tasks]
        self.probe_strategies = [str(x) for x in probe_strategies]
        self.eval_tasks = [str(x) for x in eval_tasks]
        self.near_zero = float(near_zero)
        self.spread: Spread = spread
        self.info = dict(info or {})
        self.table = aggregate_relinf(
            self.scores,
            self.eval_norm2,
            self.probe_tasks,
            self.probe_strategies,
            self.eval_tasks,
            self.steps,
            self.near_zero,
            spread,
        )
        self.excluded = near_zero_evals(self.eval_norm2, self.near_zero)

    @property
    def strategies(self) -> list[str]:
        return list(dict.fromkeys(self.probe_strategies))

    def with_settings(self, near_zero: float | None = None, spread: Spread | None = None) -> SwiftReport:
        """The same scores summarized with another near-zero threshold and/or spread (no gradients recomputed)."""
        return SwiftReport(
            self.steps,
            self.scores,
            self.eval_norm2,
            self.probe_tasks,
            self.probe_strategies,
            self.eval_tasks,
            self.near_zero if near_zero is None else near_zero,
            self.info,
            self.spread if spread is None else spread,
        )

    def compare(self, baseline: str) -> pd.DataFrame:
        """Each other strategy minus `baseline`, per step: in-task and cross-task mean differences, with sem.

        The sem of a difference is `sqrt(sem_a² + sem_b²)`; a positive `cross_task_diff` reads
        "this strategy's probes help the other tasks more than the baseline's".
        """
        if baseline not in self.strategies:
            raise ValueError(f"no strategy {baseline!r}; the probes have {self.strategies}")
        base = self.table[self.table["strategy"] == baseline].set_index("step")
        rows = []
        for strategy in self.strategies:
            if strategy == baseline:
                continue
            mine = self.table[self.table["strategy"] == strategy].set_index("step")
            for step in mine.index:
                row = {"step": int(step), "strategy": strategy, "baseline": baseline}
                for scope in ("in_task", "cross_task"):
                    row[f"{scope}_diff"] = mine.at[step, f"{scope}_mean"] - base.at[step, f"{scope}_mean"]
                    row[f"{scope}_diff_sem"] = float(
                        np.hypot(mine.at[step, f"{scope}_sem"], base.at[step, f"{scope}_sem"])
                    )
                rows.append(row)
        return pd.DataFrame(rows)

    def by_task(self) -> pd.DataFrame:
        """Mean RelInf per step, strategy, probe task and eval task (near-zero evals left out): what drives a score."""
        rows = []
        strategies, ptasks = np.asarray(self.probe_strategies), np.asarray(self.probe_tasks)
        etasks = np.asarray(self.eval_tasks)
        for t, step in enumerate(self.steps):
            valid = ~self.excluded[t][None, :] & np.isfinite(self.scores[t])
            for strategy in self.strategies:
                for pt in dict.fromkeys(ptasks[strategies == strategy]):
                    for et in dict.fromkeys(etasks):
                        block = (strategies == strategy)[:, None] & (ptasks == pt)[:, None] & (etasks == et)[None, :]
                        values = self.scores[t][block & valid]
                        mean = float(values.mean()) if values.size else np.nan
                        rows.append((int(step), strategy, pt, et, mean, int(values.size)))
        return pd.DataFrame(rows, columns=["step", "strategy", "probe_task", "eval_task", "mean", "pairs"])

    def __repr__(self) -> str:
        return (
            f"SwiftReport(strategies={self.strategies}, steps={self.steps.tolist()}, probes={len(self.probe_tasks)}, "
            f"evals={len(self.eval_tasks)}, near_zero={self.near_zero}, excluded={int(self.excluded.sum())})"
        )

    def summary(self) -> str:
        """The table as text, with what was left out stated (for printing)."""
        options = ("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format)
        with pd.option_context(*options):
            text = self.table.to_string(index=False)
        left_out = int(self.excluded.sum())
        return (
            f"Swift Study: RelInf = <g(probe), g(eval)> / <g(eval), g(eval)> over {len(self.steps)} snapshot(s), "
            f"{len(self.probe_tasks)} probes, {len(self.eval_tasks)} evals; std/sem over {self.spread}.\n{text}\n"
            f"Left out (eval already learned: <g(e),g(e)> <= {self.near_zero:g} x median, or no gradient): "
            f"{left_out} eval-snapshot(s)."
        )

    # -- plot ---------------------------------------------------------------------------
    def plot(
        self, path: str | os.PathLike | None = None, band: Literal["sem", "std"] = "sem", title: str | None = None
    ):
        """Two panels (in-task, cross-task): one line per strategy across steps, shaded mean ± `band`.

        Writes a PNG to `path` when given; returns the matplotlib figure.
        """
        if band not in ("sem", "std"):
            raise ValueError(f"band must be 'sem' or 'std', not {band!r}")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, scope, label in zip(axes, ("in_task", "cross_task"), ("in-task", "cross-task")):
            for i, strategy in enumerate(self.strategies):
                rows = self.table[self.table["strategy"] == strategy].sort_values("step")
                x, y = rows["step"].to_numpy(), rows[f"{scope}_mean"].to_numpy(float)
                width = np.nan_to_num(rows[f"{scope}_{band}"].to_numpy(float))
                color = colors[i % len(colors)]
                ax.plot(x, y, marker="o", color=color, label=strategy)
                ax.fill_between(x, y - width, y + width, color=color, alpha=0.2, linewidth=0)
            ax.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
            ax.set_title(f"{label} RelInf (mean ± {band} over {self.spread})")
            ax.set_xlabel("training step (snapshot)")
            ax.set_ylabel("RelInf")
            ax.grid(alpha=0.3)
            ax.legend(title="strategy")
        left_out = int(self.excluded.sum())
        fig.suptitle(
            title
            or f"Swift Study: {len(self.probe_tasks)} probes × {len(self.eval_tasks)} evals; "
            f"{left_out} eval-snapshot(s) left out as already learned"
        )
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig

    # -- files --------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, stem: str = "swift") -> dict[str, Path]:
        """Write `<stem>_table.csv`, `<stem>_table.json` (table + settings) and `<stem>_scores.npz` (raw scores)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "csv": out_dir / f"{stem}_table.csv",
            "json": out_dir / f"{stem}_table.json",
            "scores": out_dir / f"{stem}_scores.npz",
        }
        self.table.to_csv(paths["csv"], index=False)
        payload = {
            "near_zero": self.near_zero,
            "spread": self.spread,
            "steps": self.steps.tolist(),
            "strategies": self.strategies,
            "num_probes": len(self.probe_tasks),
            "num_evals": len(self.eval_tasks),
            "excluded_eval_snapshots": int(self.excluded.sum()),
            "info": self.info,
            "table": json.loads(self.table.to_json(orient="records")),
        }
        paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
        np.savez(
            paths["scores"],
            steps=self.steps,
            scores=self.scores,
            eval_norm2=self.eval_norm2,
            probe_tasks=np.asarray(self.probe_tasks),
            probe_strategies=np.asarray(self.probe_strategies),
            eval_tasks=np.asarray(self.eval_tasks),
        )
        return paths

    @classmethod
    def load(cls, out_dir: str | os.PathLike, stem: str = "swift", near_zero: float | None = None) -> SwiftReport:
        """Rebuild a report from the files `save` wrote (optionally with another threshold)."""
        out_dir = Path(out_dir)
        settings = json.loads((out_dir / f"{stem}_table.json").read_text())
        with np.load(out_dir / f"{stem}_scores.npz") as z:
            arrays = {k: z[k] for k in z.files}
        return cls(
            arrays["steps"],
            arrays["scores"],
            arrays["eval_norm2"],
            arrays["probe_tasks"].tolist(),
            arrays["probe_strategies"].tolist(),
            arrays["eval_tasks"].tolist(),
            settings["near_zero"] if near_zero is None else near_zero,
            settings.get("info"),
            settings.get("spread", "pairs"),
        )


# -- the study ------------------------------------------------------------------------------
def swift_study(
    out: str | os.PathLike | RunStore,
    probes: Dataset,
    evals: Dataset,
    *,
    steps: Sequence[int] | None = None,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    near_zero: float = DEFAULT_NEAR_ZERO,
    spread: Spread = "pairs",
    batch_size: int = 16,
    max_length: int | None = None,
    task_column: str = "task",
    strategy_column: str = "strategy",
    model: torch.nn.Module | None = None,
    tokenizer=None,
    formatting_func: Callable[[dict], str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SwiftReport:
    """Score strategy probes against evaluation examples at every snapshot of a recorded run.

    Args:
        out: the run's `output_dir` (or its `RunStore`), recorded with `SnapshotCallback`.
        probes: examples (`prompt`/`completion` or `text`) with a `task` and a `strategy` column
            (e.g. "direct", "cot"); include the plain strategy to compare against.
        evals: examples with a `task` column, from the tasks you care about.
        steps: snapshot steps to use (default: all).
        projection_dim: `None` for exact gradients of every trainable weight; an int to score
            seeded random projections of that size (for models too big for exact inner products).
        near_zero: an eval is left out at a snapshot when its ⟨g(e), g(e)⟩ is at most this
            fraction of the median over evals there (it is already learned; RelInf would explode).
        spread: what the table's std/sem are taken over: "pairs" or per-probe means ("probes");
            see `aggregate_relinf`.
        batch_size, max_length: batching and truncation of the gradient passes (default: the recorded trainer's).
        model, tokenizer, device: overrides; by default rebuilt from the store.
        formatting_func: the recorded run's `formatting_func`, when it used one.

    Gradients come from `hf_datasel.featurize.gradient_features` (plain, i.e. no preconditioner,
    stored as float32 and cached in the store), so a second study on the same rows is free.
    """
    store = out if isinstance(out, RunStore) else RunStore.for_output_dir(out)
    check_study_columns(probes, evals, task_column, strategy_column, formatted=formatting_func is not None)
    common = dict(
        preconditioner="none",
        k=projection_dim,
        seed=projection_seed,
        dtype="float32",
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        model=model,
        tokenizer=tokenizer,
        formatting_func=formatting_func,
        device=device,
        progress=progress,
    )
    probe_sets = gradient_features(store, probes, **common)
    eval_sets = gradient_features(store, evals, **common)
    scores, norm2 = [], []
    for p, e in zip(probe_sets, eval_sets):
        check_same_space(p, e)
        s, n = relinf(torch.from_numpy(p.raw()), torch.from_numpy(e.raw()))
        scores.append(s.numpy())
        norm2.append(n.numpy())
    spec = probe_sets[0].spec
    info = {
        "run": str(store.path),
        "gradients": "exact" if projection_dim is None else f"projected ({spec.kind}, k={spec.k}, seed={spec.seed})",
        "trainable_parameters": spec.num_params,
        "max_length": max_length,
    }
    return SwiftReport(
        [p.step for p in probe_sets],
        np.stack(scores),
        np.stack(norm2),
        probes[task_column],
        probes[strategy_column],
        evals[task_column],
        near_zero,
        info,
        spread,
    )


# -- inputs ---------------------------------------------------------------------------------
def load_rows(path: str | os.PathLike) -> Dataset:
    """A dataset from a file (`.jsonl`/`.json`, `.csv`, `.parquet`) or a `save_to_disk` folder."""
    from datasets import load_from_disk

    path = Path(path)
    if path.is_dir():
        loaded = load_from_disk(str(path))
        if not isinstance(loaded, Dataset):
            raise ValueError(f"{path} holds a DatasetDict; save one split (a Dataset) for the Swift Study.")
        return loaded
    readers = {".jsonl": Dataset.from_json, ".json": Dataset.from_json, ".csv": Dataset.from_csv}
    readers[".parquet"] = Dataset.from_parquet
    if path.suffix not in readers:
        raise ValueError(f"Cannot read {path}: give a .jsonl, .json, .csv or .parquet file, or a save_to_disk folder.")
    if not path.exists():
        raise FileNotFoundError(path)
    return readers[path.suffix](str(path))


def check_study_columns(
    probes: Dataset, evals: Dataset, task_column: str, strategy_column: str, formatted: bool = False
) -> None:
    """Probes need the example (prompt/completion, messages or text, unless a formatting function makes it:
    `formatted`), a task and a strategy; evals the example and a task."""
    for name, ds, needed in (
        ("probes", probes, (task_column, strategy_column)),
        ("evals", evals, (task_column,)),
    ):
        columns = set(ds.column_names)
        if len(ds) == 0:
            raise ValueError(f"The {name} dataset is empty.")
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"The {name} dataset needs the column(s) {missing}; it has {sorted(columns)}.")
        if not (formatted or {"prompt", "completion"} <= columns or columns & {"text", "messages"}):
            raise ValueError(
                f"The {name} dataset needs 'prompt' and 'completion' columns (or 'messages', or 'text'); "
                f"it has {sorted(columns)}."
            )


# -- command line -----------------------------------------------------------------------------
def run_swift_cli(
    run_dir: str | os.PathLike,
    probes_path: str | os.PathLike,
    evals_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: Sequence[int] | None = None,
    projection_dim: int | None = None,
    near_zero: float = DEFAULT_NEAR_ZERO,
    spread: Spread = "pairs",
    band: Literal["sem", "std"] = "sem",
    batch_size: int = 16,
    task_column: str = "task",
    strategy_column: str = "strategy",
    print_summary: bool = True,
    formatting_func: Callable[[dict], str] | None = None,
) -> dict[str, Path]:
    """`hf-datasel swift RUN_DIR PROBES EVALS OUT_DIR`: run a Swift Study and write its table, scores and plot.

    Writes `swift_table.csv`, `swift_table.json`, `swift_scores.npz` and `swift.png` under
    `out_dir`, prints the table (unless `print_summary=False`) and returns the paths (keys
    "csv", "json", "scores", "png"). `steps` picks snapshots (default all); `projection_dim`
    projects gradients (default exact); `near_zero`, `spread` and `band` as in `swift_study` /
    `SwiftReport.plot`; `formatting_func` as in `swift_study`.
    """
    report = swift_study(
        run_dir,
        probes=load_rows(probes_path),
        evals=load_rows(evals_path),
        steps=steps,
        projection_dim=projection_dim,
        near_zero=near_zero,
        spread=spread,
        batch_size=batch_size,
        task_column=task_column,
        strategy_column=strategy_column,
        formatting_func=formatting_func,
    )
    paths = report.save(out_dir)
    paths["png"] = Path(out_dir) / "swift.png"
    report.plot(paths["png"], band=band)
    if print_summary:
        print(report.summary())
        print(f"Wrote {', '.join(str(p) for p in paths.values())}")
    return paths
