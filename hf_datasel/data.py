"""One data path, the trainer's: raw rows become model inputs exactly as the recorded run's trainer made them.

Featurizing, spectra, probes and evaluation run forward passes of their own, often on datasets the
trainer never saw (targets, probes, held-out rows). Re-implementing tokenization drifts from what
was trained (BOS added by a tokenizer's post-processor, chat templates, the prompt/completion
boundary, assistant masks), so this module drives TRL's own `SFTTrainer._prepare_dataset` and the
trainer's own collator, configured by a `RowProcessing` recorded from the live trainer into the
run store (`processing.json`). A plain `transformers.Trainer` run on a pre-tokenized dataset is
recorded as `format="tokenized"`: the dataset's own `input_ids` / `labels`, through the same kind
of collator the trainer had.

Every dataset format SFTTrainer accepts works: text, prompt/completion, conversational
prompt/completion, `messages` (with `assistant_only_loss`), pre-tokenized `input_ids`
(+ `completion_mask` / `labels`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import datasets
import numpy as np
import torch
from datasets import Dataset

from .record.per_sample_loss import IGNORE_INDEX
from .rows import ROW_HASH, ROW_ID, row_hashes, strip_row_columns

PROCESSING_FILE = "processing.json"
TRAINER_ROWS_FILE = "trainer_rows.safetensors"  # the recorded trainer's own prepared rows, by raw row id
_POSITION = "__datasel_position"

Rows = list[dict[str, list[int]]]
Collator = Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class RowProcessing:
    """How a trainer turns raw rows into `input_ids` and labels; recorded so later passes do the same.

    Attributes:
        format: "sft" (TRL SFTTrainer's dataset preparation) or "tokenized" (the rows' own
            `input_ids` / `labels`, as a plain `transformers.Trainer` uses them).
        max_length, truncation_mode: SFTConfig's truncation (`None`: none).
        dataset_text_field: the text column of language-modeling rows.
        completion_only_loss: SFTConfig's value; `None` is TRL's rule, decided per dataset
            (loss on the completion only when the rows are prompt/completion).
        assistant_only_loss: loss on assistant turns only (`messages` rows).
        chat_template: the template the trainer tokenized with when it swapped in its own
            (assistant_only_loss on a template without generation markers); `None`: the tokenizer's.
        collator: "trl" (TRL's `DataCollatorForLanguageModeling`), "transformers_lm"
            (transformers' `DataCollatorForLanguageModeling(mlm=False)`: labels are the inputs with the
            pad id masked), "default" (labels as the rows give them), or "custom:<class>" (pass
            `data_collator=` to rebuild it).
        pad_to_multiple_of: the collator's padding multiple.
        formatting_func: the run used a `formatting_func` (a function is not stored: later passes over rows
            the trainer did not see need the same function again, `formatting_func=`).
    """

    format: Literal["sft", "tokenized"] = "sft"
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    dataset_text_field: str = "text"
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False
    chat_template: str | None = None
    collator: str = "trl"
    pad_to_multiple_of: int | None = None
    formatting_func: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def tag(self) -> str:
        """A canonical string of these settings (stored with the trainer's rows, compared when they are read)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RowProcessing:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> RowProcessing:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_trainer(cls, trainer) -> RowProcessing:
        """What `trainer` (an SFTTrainer or a plain Trainer) does to a raw row."""
        from trl import SFTTrainer

        from .record.trainer_hooks import RowIdCollator

        collator = trainer.data_collator
        while isinstance(collator, RowIdCollator):
            collator = collator.inner
        kind, multiple = _collator_kind(collator)
        args = trainer.args
        if isinstance(trainer, SFTTrainer) and not getattr(trainer, "_skip_prepare_dataset", False):
            return cls(
                format="sft",
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                dataset_text_field=args.dataset_text_field,
                completion_only_loss=args.completion_only_loss,
                assistant_only_loss=bool(args.assistant_only_loss),
                chat_template=getattr(trainer, "chat_template", None),
                collator=kind,
                pad_to_multiple_of=multiple,
                formatting_func=getattr(trainer, "_formatting_func", None) is not None,
            )
        return cls(format="tokenized", max_length=None, collator=kind, pad_to_multiple_of=multiple)


def _collator_kind(collator) -> tuple[str, int | None]:
    from transformers import DataCollatorForLanguageModeling as HFLanguageModeling
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, default_data_collator
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLLanguageModeling

    multiple = getattr(collator, "pad_to_multiple_of", None)
    if isinstance(collator, TRLLanguageModeling):
        if collator.padding_free:
            return f"custom:{type(collator).__qualname__}(padding_free)", multiple
        return "trl", multiple
    if isinstance(collator, HFLanguageModeling) and not collator.mlm:
        return "transformers_lm", multiple
    if collator is default_data_collator or isinstance(collator, DataCollatorWithPadding | DataCollatorForSeq2Seq):
        return "default", multiple
    cls = collator if isinstance(collator, type) else type(collator)
    return f"custom:{cls.__module__}.{cls.__qualname__}", multiple


def save_processing(store_path: str | Path, processing: RowProcessing) -> None:
    from .store import write_json

    write_json(Path(store_path) / PROCESSING_FILE, processing.to_dict())


def load_processing(store_path: str | Path) -> RowProcessing:
    """The recorded run's processing; SFTTrainer's defaults for a store recorded without it."""
    path = Path(store_path) / PROCESSING_FILE
    if not path.exists():
        return RowProcessing()
    return RowProcessing.from_dict(json.loads(path.read_text()))


# -- the trainer's own rows -------------------------------------------------------------------
def save_trainer_rows(store_path: str | Path, train_dataset, processing: RowProcessing) -> bool:
    """Keep an SFTTrainer's prepared training rows (input ids and labels, by raw row id and hash) in the store.

    Later passes over the training rows (`prepare_rows(..., trainer_rows=...)`) then take the rows
    the trainer itself trained on instead of preparing them again. Needs the row-id columns
    (`with_row_ids`); returns whether anything was written.
    """
    from safetensors.numpy import save_file

    from .store import atomic_path

    if not isinstance(train_dataset, Dataset) or processing.format != "sft":  # (an IterableDataset is not kept)
        return False
    if not {ROW_ID, ROW_HASH, "input_ids", "labels"} <= set(train_dataset.column_names):
        return False
    keys = [ROW_ID, ROW_HASH, "input_ids", "labels"]
    table = train_dataset.select_columns(keys).with_format("arrow")[:]  # a selected or shuffled view too
    arrays = {"row_id": table.column(ROW_ID).to_numpy().astype(np.int64),
              "row_hash": table.column(ROW_HASH).to_numpy().astype(np.int64)}  # fmt: skip
    for key in ("input_ids", "labels"):
        column = table.column(key).combine_chunks()
        arrays[key] = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        lengths = np.diff(column.offsets.to_numpy())
        if "lengths" in arrays and not np.array_equal(arrays["lengths"], lengths):
            return False  # labels that are not token for token: not rows this module can take
        arrays["lengths"] = lengths
    metadata = {"processing": processing.tag()}
    with atomic_path(Path(store_path) / TRAINER_ROWS_FILE) as tmp:
        save_file(arrays, str(tmp), metadata=metadata)
    return True


def _trainer_rows_for(dataset: Dataset, path: Path, processing: RowProcessing) -> dict[int, dict[str, list[int]]]:
    """Dataset position -> the recorded trainer's row, for the positions whose content the trainer trained on."""
    from safetensors import safe_open

    if not path.exists():
        return {}
    try:
        with safe_open(str(path), "np") as f:
            if (f.metadata() or {}).get("processing") != processing.tag():
                return {}  # another truncation or template: the trainer's rows are not these
            arrays = {key: f.get_tensor(key) for key in f.keys()}
        rows = _split_rows(arrays)
    except Exception:  # torn or foreign file: prepare the rows again (it is a cache of the trainer's work)
        return {}
    hashes = row_hashes(dataset)
    row_id = arrays["row_id"]
    inside = row_id < len(dataset)
    match = np.zeros(len(row_id), bool)
    match[inside] = hashes[row_id[inside]] == arrays["row_hash"][inside]
    return {int(row_id[i]): rows[i] for i in np.flatnonzero(match)}


# -- rows ------------------------------------------------------------------------------------
def prepare_rows(
    dataset: Dataset,
    tokenizer,
    processing: RowProcessing | None = None,
    cache_dir: str | Path | None = None,
    trainer_rows: str | Path | None = None,
    formatting_func: Callable[[dict], str] | None = None,
) -> Rows:
    """Per dataset row: `input_ids` and `labels` (-100 where the trainer puts no loss), as the trainer made them.

    Row i of the result is row i of `dataset`. A row the trainer would drop (no label token left
    after truncation) comes back as one pad token with no label: it has no gradient and no loss.
    With `trainer_rows` (a run store's `TRAINER_ROWS_FILE`), rows whose content the recorded trainer
    trained on (same content hash, same processing) are the trainer's own prepared rows; only the
    others are prepared. With `cache_dir`, prepared rows are kept there (safetensors), keyed by the
    dataset's fingerprint, the processing and the tokenizer, so a second pass skips tokenization.
    `formatting_func`: the recorded run's own (SFTTrainer's `formatting_func`), when it used one.
    """
    processing = processing or RowProcessing()
    if len(dataset) == 0:
        raise ValueError("The dataset is empty; there is nothing to tokenize.")
    if formatting_func is not None and not (processing.format == "sft" and processing.formatting_func):
        raise ValueError(
            "formatting_func= was passed, but the recorded run used none: its rows would not be the ones it trained on"
        )
    if trainer_rows is not None and processing.format == "sft":
        known = _trainer_rows_for(dataset, Path(trainer_rows), processing)
        if known:
            rest = [i for i in range(len(dataset)) if i not in known]
            rows = [known.get(i) for i in range(len(dataset))]
            if rest:
                prepared = prepare_rows(dataset.select(rest), tokenizer, processing, cache_dir, None, formatting_func)
                for i, row in zip(rest, prepared):
                    rows[i] = row
            return _post_collator(rows, tokenizer, processing, only=known)
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_rows_key(dataset, tokenizer, processing, formatting_func)}.safetensors"
        rows = _load_rows(path, len(dataset))
        if rows is None:
            rows = prepare_rows(dataset, tokenizer, processing, formatting_func=formatting_func)
            _save_rows(path, rows)
        return rows
    dataset = strip_row_columns(dataset)
    if processing.format == "tokenized":
        rows = _tokenized_rows(dataset, processing)
    else:
        rows = _sft_rows(dataset, tokenizer, processing, formatting_func)
    return _post_collator(rows, tokenizer, processing)


def _post_collator(rows: Rows, tokenizer, processing: RowProcessing, only=None) -> Rows:
    """Labels as the recorded collator makes them (`only`: positions still to fix, default all)."""
    if processing.collator == "transformers_lm":  # that collator trains on the inputs, pad id masked
        pad = tokenizer.pad_token_id
        for i in range(len(rows)) if only is None else only:
            ids = rows[i]["input_ids"]
            rows[i] = {"input_ids": ids, "labels": [IGNORE_INDEX if t == pad else t for t in ids]}
    return rows


def _rows_key(dataset: Dataset, tokenizer, processing: RowProcessing, formatting_func=None) -> str:
    """What the prepared rows depend on: the rows (datasets' fingerprint), the processing, the tokenizer
    and the formatting function (hashed by its code, as `datasets` keys its own `map` caches)."""
    from datasets.fingerprint import Hasher

    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps([dataset._fingerprint, len(dataset), dataset.column_names, processing.to_dict()]).encode())
    if formatting_func is not None:
        h.update(Hasher.hash(formatting_func).encode())
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        h.update(vocabulary.encode())
        specials = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.chat_template]
        h.update(json.dumps(specials, default=str).encode())
    return h.hexdigest()


def _save_rows(path: Path, rows: Rows) -> None:
    from safetensors.numpy import save_file

    from .store import atomic_path

    arrays = {
        "lengths": np.asarray([len(r["input_ids"]) for r in rows], np.int64),
        "input_ids": np.concatenate([np.asarray(r["input_ids"], np.int64) for r in rows]),
        "labels": np.concatenate([np.asarray(r["labels"], np.int64) for r in rows]),
    }
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp))


def _load_rows(path: Path, num_rows: int) -> Rows | None:
    """Cached rows, or None when there are none (or they are unreadable: a cache is recomputed, never trusted)."""
    from safetensors.numpy import load_file

    if not path.exists():
        return None
    try:
        arrays = load_file(str(path))
        lengths = arrays["lengths"]
        total = int(lengths.sum())
        if len(lengths) != num_rows or total != len(arrays["input_ids"]) or total != len(arrays["labels"]):
            return None
    except Exception:  # torn or foreign file: prepare the rows again
        return None
    return _split_rows(arrays)


def _split_rows(arrays: dict[str, np.ndarray]) -> Rows:
    """Rows from the flat `input_ids` / `labels` arrays and per-row `lengths` they are stored as."""
    cuts = np.cumsum(arrays["lengths"])[:-1]
    ids, labels = np.split(arrays["input_ids"], cuts), np.split(arrays["labels"], cuts)
    return [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in zip(ids, labels)]


def _tokenized_rows(dataset: Dataset, processing: RowProcessing) -> Rows:
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            "The recorded run trained on pre-tokenized rows (a plain Trainer), so rows need an 'input_ids' column "
            f"(and optionally 'labels'); the dataset has {dataset.column_names}."
        )
    ids = dataset["input_ids"]
    labels = dataset["labels"] if "labels" in dataset.column_names else ids
    cut = slice(None, processing.max_length)
    return [{"input_ids": list(i)[cut], "labels": list(lab)[cut]} for i, lab in zip(ids, labels)]


def _sft_rows(dataset: Dataset, tokenizer, processing: RowProcessing, formatting_func=None) -> Rows:
    from trl import SFTConfig, SFTTrainer

    columns = set(dataset.column_names)
    formats = ({"input_ids"}, {"messages"}, {"prompt", "completion"}, {processing.dataset_text_field})
    if (
        formatting_func is None
        and processing.formatting_func
        and not {"input_ids", processing.dataset_text_field} & columns
    ):
        raise ValueError(
            "The recorded run made its rows with a formatting_func, which a store cannot keep: pass the same function "
            "as formatting_func= (hf-datasel: --formatting-func module:function) for rows the trainer did not train "
            "on, or map them to a text column first."
        )
    if formatting_func is None and not any(f <= columns for f in formats):
        raise ValueError(
            f"Rows need one of SFTTrainer's formats: '{processing.dataset_text_field}', 'prompt'+'completion' "
            f"(plain or conversational), 'messages', or 'input_ids'; the dataset has {sorted(columns)}."
        )
    completion_only = processing.completion_only_loss
    if completion_only is None:  # TRL's rule: decided by the dataset's own format
        completion_only = {"prompt", "completion"} <= columns
    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig) if f.default is not dataclasses.MISSING}
    args = SimpleNamespace(
        **{
            **defaults,
            "max_length": processing.max_length,
            "truncation_mode": processing.truncation_mode,
            "dataset_text_field": processing.dataset_text_field,
            "assistant_only_loss": processing.assistant_only_loss,
            "completion_only_loss": completion_only,
            "dataset_num_proc": None,
            "shuffle_dataset": False,
        }
    )
    trainer_view = SimpleNamespace(
        _tokenizer=tokenizer, chat_template=processing.chat_template, completion_only_loss=completion_only
    )
    positioned = dataset.add_column(_POSITION, list(range(len(dataset))))
    with _no_progress_bars():
        prepared = SFTTrainer._prepare_dataset(
            trainer_view, positioned, tokenizer, args, False, formatting_func, "datasel"
        )  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: Rows = [{"input_ids": [pad], "labels": [IGNORE_INDEX]} for _ in range(len(dataset))]
    for position, ids, labels in zip(prepared[_POSITION], prepared["input_ids"], prepared["labels"]):
        rows[position] = {"input_ids": list(ids), "labels": list(labels)}
    return rows


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets' per-map progress bars off for our own preparation (five bars a call otherwise)."""
    was_disabled = datasets.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def tokenize_rows(dataset: Dataset, tokenizer, max_length: int | None = 1024) -> Rows:
    """`prepare_rows` with SFTTrainer's defaults and `max_length`: rows the way a default SFTTrainer sees them."""
    return prepare_rows(dataset, tokenizer, RowProcessing(max_length=max_length))


# -- batches -----------------------------------------------------------------------------------
def make_collator(processing: RowProcessing, tokenizer, data_collator: Collator | None = None) -> Collator:
    """The collator the recorded trainer used (or `data_collator`); batches carry an `attention_mask`."""
    if data_collator is None:
        if processing.collator.startswith("custom:"):
            raise ValueError(
                f"The recorded run used its own data collator ({processing.collator.removeprefix('custom:')}), which "
                "cannot be rebuilt from the store; pass the same collator as data_collator=."
            )
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # "transformers_lm" rows already carry that collator's labels (pad id masked), so one collator serves all.
        multiple = processing.pad_to_multiple_of
        data_collator = DataCollatorForLanguageModeling(pad_token_id=pad, pad_to_multiple_of=multiple)

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = dict(data_collator(rows))
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    return collate


def to_left_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each row's right padding to its left (same tokens, same labels); results must not depend on it."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    shift = (mask == 0).sum(1, keepdim=True)
    index = (torch.arange(width, device=mask.device)[None] - shift) % width
    return {k: v.gather(1, index) if torch.is_tensor(v) and v.shape == mask.shape else v for k, v in batch.items()}


def pad_batch(
    rows: Rows, pad_token_id: int, padding_side: Literal["left", "right"] = "right"
) -> dict[str, torch.Tensor]:
    """Pad `input_ids`/`labels` into tensors with an `attention_mask`."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        n, pad = len(r["input_ids"]), width - len(r["input_ids"])
        fill = {"input_ids": [pad_token_id] * pad, "attention_mask": [0] * pad, "labels": [IGNORE_INDEX] * pad}
        real = {"input_ids": r["input_ids"], "attention_mask": [1] * n, "labels": r["labels"]}
        for k in out:
            out[k].append(fill[k] + real[k] if padding_side == "left" else real[k] + fill[k])
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def iter_batches(
    rows: Rows,
    batch_size: int,
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
    sort_by_length: bool = True,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield (row positions, padded batch); length-sorted batches waste less compute on padding."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"])) if sort_by_length else range(len(rows))
    order = list(order)
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        yield positions, pad_batch([rows[i] for i in positions], pad_token_id, padding_side)
