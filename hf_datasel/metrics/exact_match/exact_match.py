"""Exact match of generated answers, overall and per group (e.g. per task), as an `evaluate` metric.

It ships with hf_datasel and loads offline from its folder, the way any local metric does:

    >>> import evaluate
    >>> from hf_datasel.metrics import EXACT_MATCH
    >>> em = evaluate.load(EXACT_MATCH)
    >>> scores = em.compute(predictions=["ab", "b", "c"], references=["ab", "x", "c"], groups=["t1", "t1", "t2"])
    >>> scores["exact_match"], scores["exact_match_by_group"]
    (0.6666666666666666, {'t1': 0.5, 't2': 1.0})

A prediction matches when it equals its reference character for character (after `strip=True`
removes surrounding whitespace from both): the answers of instruction-tuning tasks with one
right answer (arithmetic, string transforms, multiple-choice letters) are judged this way.
"""

from __future__ import annotations

from collections import defaultdict

import datasets
import evaluate

_DESCRIPTION = "Share of predictions equal to their reference, overall and per group."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): the right answers, one per prediction.
    groups (list of str, optional): a group (e.g. task) per prediction; adds per-group scores.
    strip (bool, optional): strip surrounding whitespace from both before comparing. Default False.
Returns:
    exact_match (float): share of exact matches, in [0, 1].
    exact_match_by_group (dict, with groups): group -> share of exact matches.
    count_by_group (dict, with groups): group -> number of predictions.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, groups=None, strip: bool = False) -> dict:
        if strip:
            predictions = [p.strip() for p in predictions]
            references = [r.strip() for r in references]
        hits = [float(p == r) for p, r in zip(predictions, references)]
        out: dict = {"exact_match": sum(hits) / len(hits) if hits else 0.0}
        if groups is not None:
            if len(groups) != len(hits):
                raise ValueError(f"groups has {len(groups)} entries for {len(hits)} predictions")
            by_group: dict[str, list[float]] = defaultdict(list)
            for group, hit in zip(groups, hits):
                by_group[str(group)].append(hit)
            out["exact_match_by_group"] = {g: sum(h) / len(h) for g, h in by_group.items()}
            out["count_by_group"] = {g: len(h) for g, h in by_group.items()}
        return out
