"""Instruction mixes in the papers' regime: learnable tasks, a long tail, a task that conflicts with the target.

Every row is `"<keyword> <letters>="` → `<answer>`, letters separated by spaces (so every letter is
one token for both embedded tokenizers) and the answer a short deterministic function of them:
a position (`0` the first letter, `-1` the last), a pair of positions, the whole word (`"all"`),
its reversal (`"rev"`), its largest or smallest letter (`"top"`, `"bot"`). A `MixFamily` names the
tasks, their shares of the pool (long-tailed), the *target* task and a *conflicting* task whose
prompts look like the target's and whose answer follows the opposite rule (the target's positions
swapped): a model fine-tuned on the whole mix mixes the two up, as real mixes hurt a target.

`make_family_mix` adds near-duplicates (a row repeated, exactly or with one letter changed and
the answer recomputed) and plausible wrong answers (two answer letters swapped, or a letter of
the prompt in place of the right one; a digit answer becomes another prompt letter's digit).
The bases the benchmark fine-tunes are pretrained on `hf_datasel.synthetic.tasks.generic_corpus`,
which holds none of these rows.

Three families: `BENCH` (calibrated on, target `val`), `UNSEEN` (other tasks, lengths, shares and
target `vf`; the settings were never chosen on it) and `HELDOUT` (target `vs`; in none of the
benchmark's reported runs): the same code path, for checking that a result holds on pools the
benchmark has never seen. Everything is a pure function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from datasets import Dataset

LETTERS = "abcdefghijkl"

Rule = tuple  # of positions (int) or one of "all", "rev", "top", "bot"


@dataclass(frozen=True)
class MixFamily:
    """A pool family: task keyword -> rule, task -> share of the pool, the target and its conflicting task."""

    name: str
    rules: dict[str, Rule]
    mix: dict[str, float]
    target: str
    conflict: str
    lengths: tuple[int, int] = (3, 5)
    letters: str = LETTERS
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if set(self.mix) != set(self.rules):
            raise ValueError(f"mix {sorted(self.mix)} and rules {sorted(self.rules)} name different tasks")
        if self.target not in self.rules or self.conflict not in self.rules:
            raise ValueError("target and conflict must be tasks of the family")


BENCH = MixFamily(
    name="bench",
    rules={
        "cp": ("all",),
        "rev": ("rev",),
        "lst": (-1,),
        "sec": (1,),
        "top": ("top",),
        "fl": (0, -1),
        "val": ("code", -1),
        "bot": ("bot",),
    },
    mix={"cp": 0.26, "rev": 0.20, "lst": 0.18, "sec": 0.10, "top": 0.08, "fl": 0.06, "val": 0.06, "bot": 0.06},
    target="val",
    conflict="lst",
    letters="abcdefghij",
)
"""The benchmark's own family (calibrated on): target `val` (the last letter's digit), conflict `lst` (the letter)."""

UNSEEN = MixFamily(
    name="unseen",
    rules={
        "rev": ("rev",),
        "cp": ("all",),
        "fst": (0,),
        "top": ("top",),
        "lf": (-1, 0),
        "vf": ("code", 0),
        "sec": (1,),
        "bot": ("bot",),
    },
    mix={"rev": 0.24, "cp": 0.22, "fst": 0.16, "top": 0.12, "lf": 0.08, "vf": 0.07, "sec": 0.06, "bot": 0.05},
    target="vf",
    conflict="fst",
    lengths=(3, 6),
    letters="abcdefghij",
)
"""A family the benchmark was never calibrated on: other tasks, shares and lengths, target `vf` (the first
letter's digit), conflict `fst` (the first letter)."""

HELDOUT = MixFamily(
    name="heldout",
    rules={
        "cp": ("all",),
        "rev": ("rev",),
        "sec": (1,),
        "bot": ("bot",),
        "fst": (0,),
        "top": ("top",),
        "vs": ("code", 1),
        "fl": (0, -1),
    },
    mix={"cp": 0.25, "rev": 0.18, "sec": 0.17, "bot": 0.10, "fst": 0.09, "top": 0.08, "vs": 0.07, "fl": 0.06},
    target="vs",
    conflict="sec",
    letters="abcdefghij",
)
"""A third family, kept out of the benchmark's runs: target `vs` (the second letter's digit), conflict `sec` (the
second letter). For checking a finding on pools neither the settings nor the reported results came from
(`python -m hf_datasel.bench.quality --family heldout --no-unseen`)."""

FAMILIES = {f.name: f for f in (BENCH, UNSEEN, HELDOUT)}


def apply_rule(rule: Rule, letters: list[str]) -> list[str]:
    """The answer letters of `rule` on `letters`."""
    if rule == ("all",):
        return list(letters)
    if rule == ("rev",):
        return letters[::-1]
    if rule == ("top",):
        return [max(letters)]
    if rule == ("bot",):
        return [min(letters)]
    if len(rule) == 2 and rule[0] == "code":  # the letter at a position as its digit: a -> 0, ..., j -> 9
        return [str(LETTERS.index(letters[rule[1]]) % 10)]
    if all(isinstance(p, int) for p in rule):
        return [letters[p] for p in rule]
    raise ValueError(f"unknown rule {rule!r}")


def _prompt(task: str, letters: list[str]) -> str:
    return f"{task} {' '.join(letters)}="


def _letters(prompt: str) -> list[str]:
    return prompt.split(" ", 1)[1][:-1].split(" ")


def _corrupt(answer: list[str], letters: list[str], rng: random.Random) -> list[str]:
    """A wrong answer that looks right: two answer letters swapped, or one replaced by another prompt letter.

    A digit answer (a letter's code) becomes the code of another letter of the prompt (else a digit off by one).
    """
    out = list(answer)
    if len(out) == 1 and out[0].isdigit():
        codes = [str(LETTERS.index(c) % 10) for c in dict.fromkeys(letters)]
        others = [c for c in codes if c != out[0]] or [str((int(out[0]) + rng.choice([-1, 1])) % 10)]
        return [rng.choice(others)]
    if len(out) >= 2 and len(set(out)) >= 2 and rng.random() < 0.5:
        i, j = rng.sample([k for k in range(len(out))], 2)
        while out[i] == out[j]:
            i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
        return out
    i = rng.randrange(len(out))
    others = [c for c in dict.fromkeys(letters) if c != out[i]] or [c for c in LETTERS if c != out[i]]
    out[i] = rng.choice(others)
    return out


def _random_letters(family: MixFamily, rng: random.Random) -> list[str]:
    return [rng.choice(family.letters) for _ in range(rng.randint(*family.lengths))]


def make_family_rows(
    family: MixFamily, num_rows: int, tasks: tuple[str, ...] | None = None, noise: float = 0.0, seed: int = 0
) -> Dataset:
    """`num_rows` independent rows of `tasks` (default: the family's mix, by share). Columns as `make_family_mix`."""
    if num_rows <= 0:
        raise ValueError("num_rows must be positive")
    if not 0.0 <= noise < 1.0:
        raise ValueError("noise must be in [0, 1)")
    names = tuple(family.mix) if tasks is None else tuple(tasks)
    weights = [family.mix[t] for t in names] if tasks is None else None
    rng = random.Random(seed)
    rows: dict[str, list] = {"prompt": [], "completion": [], "task": [], "is_noisy": [], "is_duplicate": []}
    for _ in range(num_rows):
        task = rng.choices(names, weights=weights)[0]
        letters = _random_letters(family, rng)
        answer = apply_rule(family.rules[task], letters)
        noisy = rng.random() < noise
        if noisy:
            answer = _corrupt(answer, letters, rng)
        rows["prompt"].append(_prompt(task, letters))
        rows["completion"].append(" ".join(answer))
        rows["task"].append(task)
        rows["is_noisy"].append(noisy)
        rows["is_duplicate"].append(False)
    return Dataset.from_dict(rows)


def make_family_mix(
    family: MixFamily = BENCH, num_rows: int = 2000, noise: float = 0.2, duplicates: float = 0.15, seed: int = 0
) -> Dataset:
    """A pool of `family`: long-tailed tasks, near-duplicates, plausible wrong answers.

    A `duplicates` share of the rows repeat an earlier row of the same task (half exactly, half
    with one letter changed and the answer recomputed); a duplicate of a noisy row is noisy too
    (with a wrong answer of its own). Columns: `prompt`, `completion`, `task`, `is_noisy`,
    `is_duplicate`.
    """
    if not 0.0 <= duplicates < 1.0:
        raise ValueError("duplicates must be in [0, 1)")
    base = make_family_rows(family, num_rows, noise=noise, seed=seed)
    rows = {k: list(base[k]) for k in base.column_names}
    rng = random.Random(seed + 7)
    for i in range(1, num_rows):
        if rng.random() >= duplicates:
            continue
        j = rng.randrange(i)
        task, letters = rows["task"][j], _letters(rows["prompt"][j])
        if rng.random() >= 0.5:
            k = rng.randrange(len(letters))
            letters[k] = rng.choice([c for c in family.letters if c != letters[k]])
        answer = apply_rule(family.rules[task], letters)
        noisy = rows["is_noisy"][j]
        if noisy:
            answer = _corrupt(answer, letters, rng)
        rows["prompt"][i], rows["completion"][i] = _prompt(task, letters), " ".join(answer)
        rows["task"][i], rows["is_noisy"][i], rows["is_duplicate"][i] = task, noisy, True
    return Dataset.from_dict(rows)
