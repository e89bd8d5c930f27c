"""What a selection holds, as an `evaluate` metric: rows per source, the target's share, flagged rows' shares.

It ships with hf_datasel and loads offline from its folder, like any local metric. One entry
per row of the *pool*: whether it was selected and its source (task); optional per-row flags
(e.g. known-wrong answers, near-duplicates) and a target source add their shares in the subset
and in the pool:

    >>> import evaluate
    >>> from hf_datasel.metrics import SELECTION_STATS
    >>> stats = evaluate.load(SELECTION_STATS)
    >>> out = stats.compute(
    ...     selected=[True, True, False, True], source=["a", "b", "b", "b"],
    ...     target="b", flags={"noisy": [False, True, True, False]},
    ... )
    >>> out["rows"], out["target_fraction"], out["noisy_fraction"], out["pool_noisy_fraction"]
    (3, 0.6666666666666666, 0.3333333333333333, 0.5)
    >>> out["rows_by_source"], out["pool_rows_by_source"]
    ({'a': 1, 'b': 2}, {'a': 1, 'b': 3})

The `hf-datasel bench quality` tables (noisy rows, target rows, duplicates, rows per task) are
these numbers; a user's own loop that feeds it a `Selection` over their pool gets the same.
"""

from __future__ import annotations

from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "Composition of a selection from a pool: rows per source, target share, shares of flagged rows."
_KWARGS_DESCRIPTION = """
Args:
    selected (list of bool): one per pool row, True when the row is in the selection.
    source (list of str): one per pool row, its source (e.g. task).
    target (str, optional): a source whose share in the selection and in the pool is reported.
    flags (dict of str -> list of bool, optional): per-row flags (e.g. {"noisy": ..., "duplicate": ...}),
        each one per pool row; adds `<flag>_rows`, `<flag>_fraction` and `pool_<flag>_fraction`.
Returns:
    rows (int), pool_rows (int): selected rows, pool rows.
    rows_by_source (dict), pool_rows_by_source (dict): source -> rows, in the selection and the pool.
    share_by_source (dict): source -> its share of the selection (NaN for an empty selection).
    target_rows, target_fraction, pool_target_fraction (with target).
    <flag>_rows, <flag>_fraction, pool_<flag>_fraction (per flag).
"""


def _share(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SelectionStats(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"selected": datasets.Value("bool"), "source": datasets.Value("string")}),
        )

    def _compute(self, selected, source, target: str | None = None, flags: dict | None = None) -> dict:
        picked = [bool(s) for s in selected]
        sources = [str(s) for s in source]
        rows, pool_rows = sum(picked), len(picked)
        by_source = Counter(s for s, p in zip(sources, picked) if p)
        pool_by_source = Counter(sources)
        out: dict = {
            "rows": rows,
            "pool_rows": pool_rows,
            "rows_by_source": {s: by_source[s] for s in sorted(pool_by_source) if by_source[s]},
            "pool_rows_by_source": dict(sorted(pool_by_source.items())),
            "share_by_source": {s: _share(by_source[s], rows) for s in sorted(pool_by_source) if by_source[s]},
        }
        if target is not None:
            out["target_rows"] = by_source[str(target)]
            out["target_fraction"] = _share(by_source[str(target)], rows)
            out["pool_target_fraction"] = _share(pool_by_source[str(target)], pool_rows)
        for name, values in (flags or {}).items():
            values = [bool(v) for v in values]
            if len(values) != pool_rows:
                raise ValueError(f"flag {name!r} has {len(values)} entries for {pool_rows} pool rows")
            flagged = sum(v and p for v, p in zip(values, picked))
            out[f"{name}_rows"] = flagged
            out[f"{name}_fraction"] = _share(flagged, rows)
            out[f"pool_{name}_fraction"] = _share(sum(values), pool_rows)
        return out
