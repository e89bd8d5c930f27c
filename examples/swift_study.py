"""Swift Study on the embedded default: would chain-of-thought answers help more than direct ones?

1. A tiny Llama warms up on direct answers of the synthetic tasks (add, reverse, sort, copy)
   with `SnapshotCallback`, which keeps the trainable weights at a few steps.
2. Probes: the same questions answered in several ways. `direct` gives the answer; `cot` writes
   the steps first and ends with `so <answer>` (and `wrong`, a control, gives a plausible wrong
   answer: `--strategies direct,cot,wrong`):
       add 27+15=   ->  7+5=12 20+10=30 30+12=42 so 42
       rev abcd=    ->  d c b a so dcba          (letters read from the end)
       sort dbca=   ->  a b c d so abcd          (letters in alphabetical order)
       copy abcd=   ->  a b c d so abcd          (letters one by one)
   (The character tokenizer knows digits, `+ =`, space and the letters of the tasks, so the
   steps use only those.)
3. Evaluation examples: held-out direct questions of every task.
4. `swift_study` scores every probe against every eval at each snapshot and prints the table;
   the plot shows in-task and cross-task RelInf across steps, one line per strategy.

    python examples/swift_study.py --output-dir runs/swift --plot docs/swift.png

Takes about a minute on 2 CPU cores with the defaults (most of it the warmup).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import datasets
from datasets import Dataset

from hf_datasel.synthetic import TASKS, make_pool


def chain_of_thought(task: str, prompt: str, answer: str) -> str:
    """Worked steps for one synthetic question, ending with `so <answer>`."""
    if task == "add":
        a, b = (int(x) for x in prompt.removeprefix("add ").removesuffix("=").split("+"))
        ones, tens = a % 10 + b % 10, (a // 10 + b // 10) * 10
        return f"{a % 10}+{b % 10}={ones} {a // 10 * 10}+{b // 10 * 10}={tens} {tens}+{ones}={a + b} so {answer}"
    word = prompt.split(" ", 1)[1].removesuffix("=")
    if task == "reverse":
        steps = word[::-1]
    elif task == "sort":
        steps = "".join(sorted(word))
    elif task == "copy":
        steps = word
    else:
        raise ValueError(f"no chain of thought for task {task!r}")
    return f"{' '.join(steps)} so {answer}"


def _clean_rows(per_task: int, tasks: tuple[str, ...], seed: int) -> Dataset:
    """`per_task` correct rows of each task, in task order."""
    pool = make_pool(per_task * len(tasks) * 6 + 40, tasks=tasks, noise=0.0, seed=seed)
    keep = [i for t in tasks for i in [j for j, task in enumerate(pool["task"]) if task == t][:per_task]]
    return pool.select(keep).remove_columns("is_noisy")


def wrong_answer(task: str, answer: str) -> str:
    """A plausible but wrong answer (a control strategy: its probes should not help)."""
    if task == "add":
        return str(int(answer) + 10)
    return answer[1:] + answer[0] if len(set(answer)) > 1 else answer + answer[0]


STRATEGIES = {
    "direct": lambda task, prompt, answer: answer,
    "cot": chain_of_thought,
    "wrong": lambda task, prompt, answer: wrong_answer(task, answer),
}


def make_probes(
    per_task: int = 3, tasks: tuple[str, ...] = TASKS, seed: int = 101, strategies: tuple[str, ...] = ("direct", "cot")
) -> Dataset:
    """The same questions answered once per strategy: `direct` (the answer), `cot` (steps, then the answer),
    and optionally `wrong` (a plausible wrong answer, a control that should score low)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")
    rows = _clean_rows(per_task, tasks, seed)
    out = {"prompt": [], "completion": [], "task": [], "strategy": []}
    for strategy in strategies:
        for prompt, answer, task in zip(rows["prompt"], rows["completion"], rows["task"]):
            out["prompt"].append(prompt)
            out["completion"].append(STRATEGIES[strategy](task, prompt, answer))
            out["task"].append(task)
            out["strategy"].append(strategy)
    return Dataset.from_dict(out)


def make_evals(per_task: int = 4, tasks: tuple[str, ...] = TASKS, seed: int = 202) -> Dataset:
    """Held-out direct questions of every task (columns `prompt`, `completion`, `task`)."""
    return _clean_rows(per_task, tasks, seed)


def warmup(output_dir: str | os.PathLike, max_steps: int, snapshots: int, train_rows: int, seed: int):
    """Train the tiny proxy on direct answers, with `snapshots` evenly spaced SnapshotCallback steps."""
    from trl import SFTConfig, SFTTrainer

    from hf_datasel import SnapshotCallback
    from hf_datasel.synthetic import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    steps = sorted({max(1, round(max_steps * (i + 1) / snapshots)) for i in range(snapshots)})
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_length=64,
        save_strategy="no",
        logging_steps=max(1, max_steps // 4),
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=seed,
    )
    trainer = SFTTrainer(
        model=build_model(tokenizer, seed=seed),
        args=args,
        train_dataset=make_pool(train_rows, noise=0.0, seed=seed),
        processing_class=tokenizer,
        callbacks=[SnapshotCallback(steps=steps)],
    )
    trainer.train()
    return trainer


def main(
    output_dir: str | os.PathLike = "runs/swift",
    plot: str | os.PathLike | None = None,
    max_steps: int = 40,
    snapshots: int = 4,
    train_rows: int = 640,
    probes_per_task: int = 3,
    evals_per_task: int = 4,
    projection_dim: int | None = None,
    seed: int = 0,
    strategies: tuple[str, ...] = ("direct", "cot"),
    reuse: bool = False,
    spread: str = "pairs",
):
    """Warm up (unless `reuse` and snapshots exist), build probes and evals, run the Swift Study; print the
    table and write the plot and files."""
    from hf_datasel import swift_study

    output_dir = Path(output_dir)
    from hf_datasel import RunStore
    from hf_datasel.featurize import snapshot_steps

    if not (reuse and snapshot_steps(RunStore.for_output_dir(output_dir))):
        warmup(output_dir, max_steps, snapshots, train_rows, seed)
    probes, evals = make_probes(probes_per_task, strategies=strategies), make_evals(evals_per_task)
    probes.to_json(output_dir / "probes.jsonl")  # the same inputs for `hf-datasel swift`
    evals.to_json(output_dir / "evals.jsonl")
    report = swift_study(output_dir, probes=probes, evals=evals, projection_dim=projection_dim, spread=spread)
    print(report.summary())
    if "direct" in strategies and len(strategies) > 1:
        print("\nminus direct (a positive cross_task_diff: these probes help the other tasks more than direct ones):")
        print(report.compare("direct").to_string(index=False, float_format="{:.4f}".format))
    report.save(output_dir / "swift")
    plot = Path(plot) if plot is not None else output_dir / "swift" / "swift.png"
    report.plot(plot, title=f"Swift Study on the synthetic tasks: {' vs '.join(strategies)} probes, tiny proxy")
    print(f"plot: {plot}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/swift")
    parser.add_argument("--plot", default=None, help="PNG path (default: <output-dir>/swift/swift.png)")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--snapshots", type=int, default=4)
    parser.add_argument("--train-rows", type=int, default=640)
    parser.add_argument("--probes-per-task", type=int, default=3)
    parser.add_argument("--evals-per-task", type=int, default=4)
    parser.add_argument("--projection-dim", type=int, default=None, help="project gradients to this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default="direct,cot", help="comma-separated, from direct, cot, wrong")
    parser.add_argument("--reuse", action="store_true", help="skip the warmup when the output dir has snapshots")
    parser.add_argument("--spread", choices=("pairs", "probes"), default="pairs", help="std/sem over pairs or probes")
    a = parser.parse_args()
    datasets.disable_progress_bars()
    main(
        a.output_dir,
        a.plot,
        a.max_steps,
        a.snapshots,
        a.train_rows,
        a.probes_per_task,
        a.evals_per_task,
        a.projection_dim,
        a.seed,
        tuple(a.strategies.split(",")),
        a.reuse,
        a.spread,
    )
