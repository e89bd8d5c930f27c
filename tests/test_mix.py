"""The papers'-regime pool families: every answer against an independent computation, noise, duplicates."""

from __future__ import annotations

import pytest

from hf_datasel.synthetic.mix import (
    BENCH,
    FAMILIES,
    HELDOUT,
    UNSEEN,
    MixFamily,
    make_family_mix,
    make_family_rows,
)

# the rules written out again, independently of `apply_rule`
BY_HAND = {
    "cp": lambda w: w,
    "rev": lambda w: w[::-1],
    "lst": lambda w: w[-1],
    "fst": lambda w: w[0],
    "sec": lambda w: w[1],
    "ptl": lambda w: w[-2],
    "top": lambda w: max(w),
    "bot": lambda w: min(w),
    "fl": lambda w: w[0] + w[-1],
    "lf": lambda w: w[-1] + w[0],
    "val": lambda w: "abcdefghij".index(w[-1]),
    "vf": lambda w: "abcdefghij".index(w[0]),
    "vs": lambda w: "abcdefghij".index(w[1]),
}


def _right_answer(prompt: str) -> str:
    task, body = prompt[:-1].split(" ", 1)
    word = body.replace(" ", "")
    out = BY_HAND[task](word)
    return str(out) if isinstance(out, int) else " ".join(out)


def test_worked_examples():
    rows = make_family_rows(BENCH, 200, seed=1)
    assert {"prompt", "completion", "task", "is_noisy", "is_duplicate"} == set(rows.column_names)
    for prompt, completion in zip(rows["prompt"], rows["completion"]):
        assert completion == _right_answer(prompt)
    assert _right_answer("val c a j=") == "9" and _right_answer("fl c a j=") == "c j"


@pytest.mark.parametrize("family", [BENCH, UNSEEN, HELDOUT], ids=lambda f: f.name)
def test_pool_answers_noise_and_duplicates(family: MixFamily):
    pool = make_family_mix(family, 3000, noise=0.2, duplicates=0.15, seed=5)
    assert make_family_mix(family, 3000, noise=0.2, duplicates=0.15, seed=5)["prompt"] == pool["prompt"]
    lo, hi = family.lengths
    for prompt, completion, noisy, task in zip(pool["prompt"], pool["completion"], pool["is_noisy"], pool["task"]):
        assert prompt.startswith(task + " ") and prompt.endswith("=")
        letters = prompt[len(task) + 1 : -1].split(" ")
        assert lo <= len(letters) <= hi and set(letters) <= set(family.letters)
        right = _right_answer(prompt)
        assert (completion != right) == noisy  # a wrong answer is always wrong, a clean one right
        assert len(completion) == len(right)  # and looks like a right one
    n = len(pool)
    assert 0.17 < sum(pool["is_noisy"]) / n < 0.23
    assert 0.12 < sum(pool["is_duplicate"]) / n < 0.18
    for task, share in family.mix.items():
        assert abs(pool["task"].count(task) / n - share) < 0.025, task
    assert family.target in family.mix and family.mix[family.conflict] > family.mix[family.target]


def test_families_are_different_and_checked():
    assert set(FAMILIES) == {"bench", "unseen", "heldout"}
    assert len({f.target for f in FAMILIES.values()}) == len(FAMILIES)
    with pytest.raises(ValueError, match="different tasks"):
        MixFamily("x", rules={"cp": ("all",)}, mix={"rev": 1.0}, target="cp", conflict="cp")
    with pytest.raises(ValueError, match="target"):
        MixFamily("x", rules={"cp": ("all",)}, mix={"cp": 1.0}, target="rev", conflict="cp")
