"""Shared plumbing of the recipes: argument parsing with CPU-sized `--tiny` defaults, model and data loading.

Every recipe runs two ways: on real models and datasets (paths or Hub ids, launched with
`accelerate launch`), and with `--tiny`, on the embedded tiny Llama and synthetic pool, on
CPU, in seconds. CI runs the `--tiny` mode.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from accelerate import PartialState  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments  # noqa: E402

CHECKPOINTING_FLAG = (
    "activation_checkpointing"
    if any(f.name == "activation_checkpointing" for f in dataclasses.fields(TrainingArguments))
    else "gradient_checkpointing"
)

# Training defaults of the tiny CPU mode (any of them can still be given on the command line).
TINY_TRAINING_DEFAULTS = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=1e-3,
    max_length=32,
    bf16=False,
    use_cpu=True,
    **{CHECKPOINTING_FLAG: False},  # the name this transformers has (the old one warns)
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
)


@dataclass
class ModelDataArguments:
    """Which model to train and which raw dataset to record on."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model path or Hub id (not with --tiny)."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "Raw dataset: a save_to_disk folder, a json/jsonl/parquet/csv file, or a Hub id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to use when --dataset has several."})
    tiny: bool = field(default=False, metadata={"help": "Use the embedded tiny Llama and synthetic pool, on CPU."})
    pool_size: int = field(default=96, metadata={"help": "Rows of the synthetic pool (with --tiny)."})
    model_seed: int = field(default=0, metadata={"help": "Initialisation seed of the tiny model (with --tiny)."})

    def __post_init__(self):
        if not self.tiny and (self.model_name_or_path is None or self.dataset is None):
            raise ValueError("give --model_name_or_path and --dataset, or --tiny for the embedded CPU example.")


def parse(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """Parse `argv` into `dataclass_types`; `--tiny` switches the training defaults to the CPU-sized ones."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(dataclass_types)
    if "--tiny" in argv:
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in TINY_TRAINING_DEFAULTS.items() if k in known})
    return parser.parse_args_into_dataclasses(args=argv)


def load_model_and_tokenizer(args: ModelDataArguments, workdir: str | os.PathLike, spec: str = "proxy"):
    """The model and tokenizer to train; with `--tiny`, a tiny Llama saved under `workdir` and loaded back.

    The tiny model is written once (main process first) and loaded with `from_pretrained` on
    every process, so all processes start from the same weights and the store can name a real path.
    """
    if not args.tiny:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path), tokenizer
    from hf_datasel.synthetic import LARGE, PROXY, build_model, build_tokenizer

    path = Path(workdir) / f"tiny-{spec}"
    with PartialState().main_process_first():
        if PartialState().is_main_process and not (path / "config.json").exists():
            tokenizer = build_tokenizer() if spec == "proxy" else build_tokenizer(vocab_size=64)
            model = build_model(tokenizer, PROXY if spec == "proxy" else LARGE, seed=args.model_seed)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def load_pool(args: ModelDataArguments) -> Dataset:
    """The raw dataset to record on: the synthetic pool with `--tiny`, else `--dataset`."""
    if args.tiny and args.dataset is None:
        from hf_datasel.synthetic import make_pool

        return make_pool(args.pool_size, noise=0.2, seed=0)
    from hf_datasel.hub import load_local_dataset

    if Path(args.dataset).exists():
        return load_local_dataset(args.dataset, split=args.dataset_split)
    from datasets import load_dataset

    return load_dataset(args.dataset, split=args.dataset_split)


def parse_steps(text: str | None) -> list[int] | str | None:
    """`"10,20,30"` → [10, 20, 30]; `"saves"` stays as is; empty → None."""
    if not text:
        return None
    if text == "saves":
        return "saves"
    return [int(s) for s in text.split(",") if s.strip()]


def as_budget(text: str) -> float | int:
    """A budget from the command line, read by its type: `0.2` and `1.0` are fractions, `500` is 500 rows."""
    from hf_datasel.selector import parse_budget

    return parse_budget(text)
