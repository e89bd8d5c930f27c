"""A synthetic instruction-tuning pool: short string tasks a tiny model can learn on a CPU.

Rows are prompt/completion pairs with a `task` column; a chosen fraction carries a
plausible but wrong completion and is marked `is_noisy`, so selections can be judged by
how many noisy rows they keep. Everything is a pure function of the seed.

`make_mix` builds a pool that looks like a real instruction mix: a long-tailed task mix
(`MIX`: a few large sources, many small ones), near-duplicate rows and plausible wrong
answers. `generic_corpus` is pretraining text for the large model: the same characters and
string operations, but as plain lines without the tasks' keywords or `prompt=answer` form,
so no pool row is in it.
"""

from __future__ import annotations

import random
import string

from datasets import Dataset

TASKS = ("add", "reverse", "sort", "copy")
EXTRA_TASKS = ("rot", "rep", "odds", "last")
LETTERS = string.ascii_lowercase[:12]

MIX: dict[str, float] = {
    "copy": 0.30,
    "reverse": 0.22,
    "add": 0.16,
    "rep": 0.10,
    "rot": 0.08,
    "odds": 0.06,
    "sort": 0.05,
    "last": 0.03,
}
"""A long-tailed task mix: three large sources hold two thirds of the rows, five small ones the rest."""


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _example(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"add {a}+{b}=", str(a + b)
    word = _word(rng)
    if task == "reverse":
        return f"rev {word}=", word[::-1]
    if task == "sort":
        return f"sort {word}=", "".join(sorted(word))
    if task == "copy":
        return f"copy {word}=", word
    return _extra(task, word)


def _extra(task: str, word: str) -> tuple[str, str]:
    """The long tail's tasks (their prompts use only characters the embedded tokenizers know)."""
    if task == "rot":
        return f"rot {word}=", word[1:] + word[0]
    if task == "rep":
        return f"rep {word}=", word + word
    if task == "odds":
        return f"odds {word}=", word[::2]
    if task == "last":
        return f"last {word}=", word[-1]
    raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS + EXTRA_TASKS}")


def _answer(task: str, prompt: str) -> str:
    """The right completion of a prompt, recomputed (for near-duplicates with an edited prompt)."""
    body = prompt.split(" ", 1)[1][:-1]
    if task == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    return _example_for(task, body)


def _example_for(task: str, word: str) -> str:
    ops = {"reverse": word[::-1], "sort": "".join(sorted(word)), "copy": word}
    return ops[task] if task in ops else _extra(task, word)[1]


def _corrupt(task: str, answer: str, rng: random.Random) -> str:
    """A wrong answer that looks right: off by a little, or two characters swapped."""
    if task == "add":
        return str(max(0, int(answer) + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])))
    chars = list(answer)
    if len(chars) < 2:  # one character: another letter
        return rng.choice([c for c in LETTERS if c != answer])
    i, j = rng.sample(range(len(chars)), 2)
    if chars[i] == chars[j]:
        chars[i] = rng.choice([c for c in LETTERS if c != chars[i]])
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def make_pool(
    num_rows: int = 2000,
    tasks: tuple[str, ...] = TASKS,
    noise: float = 0.2,
    seed: int = 0,
    task_weights: tuple[float, ...] | None = None,
) -> Dataset:
    """Columns: `prompt`, `completion`, `task`, `is_noisy`. `noise` is the wrong-answer fraction."""
    if num_rows <= 0:
        raise ValueError("num_rows must be positive")
    if not 0.0 <= noise < 1.0:
        raise ValueError("noise must be in [0, 1)")
    rng = random.Random(seed)
    rows = {"prompt": [], "completion": [], "task": [], "is_noisy": []}
    for _ in range(num_rows):
        task = rng.choices(tasks, weights=task_weights)[0]
        prompt, answer = _example(task, rng)
        noisy = rng.random() < noise
        rows["prompt"].append(prompt)
        rows["completion"].append(_corrupt(task, answer, rng) if noisy else answer)
        rows["task"].append(task)
        rows["is_noisy"].append(noisy)
    return Dataset.from_dict(rows)


def _near_duplicate(task: str, prompt: str, rng: random.Random) -> tuple[str, str]:
    """The same row with one character of its operand changed (half the time: unchanged), answer recomputed."""
    if rng.random() < 0.5:
        return prompt, _answer(task, prompt)
    head, body = prompt.split(" ", 1)
    body = body[:-1]
    i = rng.randrange(len(body))
    if task == "add":
        if not body[i].isdigit():
            i = 0
        new = rng.choice([d for d in "0123456789" if d != body[i]])
    else:
        new = rng.choice([c for c in LETTERS if c != body[i]])
    edited = f"{head} {body[:i]}{new}{body[i + 1 :]}="
    return edited, _answer(task, edited)


def make_mix(
    num_rows: int = 2000,
    mix: dict[str, float] | None = None,
    noise: float = 0.2,
    duplicates: float = 0.15,
    seed: int = 0,
) -> Dataset:
    """A pool like a real instruction mix: long-tailed tasks (`MIX`), near-duplicates, plausible wrong answers.

    A `duplicates` share of the rows repeat an earlier row of the same task (exactly, or with one
    operand character changed and the answer recomputed); a duplicate of a noisy row is noisy
    too. Columns: `prompt`, `completion`, `task`, `is_noisy`, `is_duplicate`.
    """
    mix = dict(MIX if mix is None else mix)
    if not 0.0 <= duplicates < 1.0:
        raise ValueError("duplicates must be in [0, 1)")
    base = make_pool(num_rows, tasks=tuple(mix), noise=noise, seed=seed, task_weights=tuple(mix.values()))
    rng = random.Random(seed + 7)
    rows = {k: list(base[k]) for k in ("prompt", "completion", "task", "is_noisy")}
    rows["is_duplicate"] = [False] * num_rows
    for i in range(1, num_rows):
        if rng.random() >= duplicates:
            continue
        j = rng.randrange(i)
        task = rows["task"][j]
        prompt, answer = _near_duplicate(task, rows["prompt"][j], rng)
        noisy = rows["is_noisy"][j]
        rows["prompt"][i], rows["task"][i], rows["is_noisy"][i], rows["is_duplicate"][i] = prompt, task, noisy, True
        rows["completion"][i] = _corrupt(task, answer, rng) if noisy else answer
    return Dataset.from_dict(rows)


def generic_corpus(num_rows: int = 4000, seed: int = 0) -> list[str]:
    """Pretraining lines: words and numbers with the string operations of the tasks, in free form.

    Each line strings together a few pieces like `bad dab`, `12 7 19`, `cab abc`, `fig fig`,
    `hej ejh` (reversal, sum, sorting, repetition, rotation), separated by spaces, without task
    keywords or `=`: the model learns the characters and the operations, not the pool's rows.
    """
    rng = random.Random(seed + 20_000)
    lines = []
    for _ in range(num_rows):
        pieces = []
        for _ in range(rng.randint(2, 4)):
            w = _word(rng, 2, 6)
            kind = rng.randrange(6)
            if kind == 0:
                a, b = rng.randint(0, 49), rng.randint(0, 49)
                pieces.append(f"{a} {b} {a + b}")
            else:
                pieces.append(f"{w} {[w[::-1], ''.join(sorted(w)), w + w, w[1:] + w[0], w][kind - 1]}")
        lines.append(" ".join(pieces))
    return lines


def corpus(seed: int = 0, num_rows: int = 2000) -> list[str]:
    """Text to train the tokenizers on: clean rows of every task."""
    pool = make_pool(num_rows, noise=0.0, seed=seed + 10_000)
    return [p + c for p, c in zip(pool["prompt"], pool["completion"])]
