"""A synthetic instruction-tuning pool: short string tasks a tiny model can learn on a CPU.

Rows are prompt/completion pairs with a `task` column; a chosen fraction carries a
plausible but wrong completion and is marked `is_noisy`, so selections can be judged by
how many noisy rows they keep. Everything is a pure function of the seed.
"""

from __future__ import annotations

import random
import string

from datasets import Dataset

TASKS = ("add", "reverse", "sort", "copy")
LETTERS = string.ascii_lowercase[:12]


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
    raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS}")


def _corrupt(task: str, answer: str, rng: random.Random) -> str:
    """A wrong answer that looks right: off by a little, or two characters swapped."""
    if task == "add":
        return str(max(0, int(answer) + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])))
    chars = list(answer)
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


def corpus(seed: int = 0, num_rows: int = 2000) -> list[str]:
    """Text to train the tokenizers on: clean rows of every task."""
    pool = make_pool(num_rows, noise=0.0, seed=seed + 10_000)
    return [p + c for p, c in zip(pool["prompt"], pool["completion"])]
