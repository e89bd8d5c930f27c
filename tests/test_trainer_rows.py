"""Gradients of exactly what was trained: every SFTTrainer format, plain Trainer, twelve families, full and LoRA.

Each case records a real run with learning rate 0 (weights stay fixed), then compares the
library's exact per-sample gradients (`gradient_features(k=None)`, which rebuild the rows from the
raw dataset and the store alone) with the gradient of the *trainer's own* loss on the trainer's
own processed row, collated by the trainer's own collator, one row at a time through autograd.
The tokenizer adds BOS and has a chat template, as users' Hub tokenizers do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from hf_datasel import DataSelector, LossRecorderCallback, SnapshotCallback, with_row_ids
from hf_datasel.data import TRAINER_ROWS_FILE, load_processing, prepare_rows
from hf_datasel.featurize import gradient_features
from hf_datasel.record.trainer_hooks import ROW_LABELS
from hf_datasel.rows import ROW_ID
from hf_datasel.store import RunStore, StoreError
from hf_datasel.synthetic import build_chat_tokenizer, build_model, make_pool
from hf_datasel.synthetic.families import FAMILIES, MOE_FAMILIES, build_family_model, lora_targets

COSINE, RELATIVE = 0.9999, 1e-3  # fp32 per-row gradients of the same loss on the same inputs


@pytest.fixture(scope="module")
def chat_tok():
    return build_chat_tokenizer()


@pytest.fixture(scope="module")
def raw_pool():
    pool = make_pool(10, noise=0.2, seed=4)
    long_prompt = {"prompt": "copy " + "ab" * 40 + "=", "completion": "ab", "task": "copy", "is_noisy": False}
    return Dataset.from_list([*pool.to_list(), long_prompt])  # its prompt alone fills max_length: TRL drops it


def _as(fmt: str, pool: Dataset, tok) -> Dataset:
    rows = pool.to_list()
    if fmt == "prompt_completion":
        return Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "task")} for r in rows])
    if fmt == "text":
        return Dataset.from_list([{"text": r["prompt"] + r["completion"], "task": r["task"]} for r in rows])
    if fmt == "conversational_prompt_completion":
        return Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "completion": [{"role": "assistant", "content": r["completion"]}],
                    "task": r["task"],
                }
                for r in rows
            ]
        )
    if fmt == "messages":
        return Dataset.from_list(
            [
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["completion"]},
                    ],
                    "task": r["task"],
                }
                for r in rows
            ]
        )
    if fmt == "tokenized":  # pre-tokenized with a completion mask, as users ship them
        out = []
        for r in rows:
            prompt = tok(r["prompt"])["input_ids"]
            ids = tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]
            out.append({"input_ids": ids, "completion_mask": [0] * len(prompt) + [1] * (len(ids) - len(prompt)),
                        "task": r["task"]})  # fmt: skip
        return Dataset.from_list(out)
    raise ValueError(fmt)


def _sft_run(tmp_path, model, tok, train, compute_loss_func=None, formatting_func=None, **config):
    kwargs = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.0,
        save_strategy="no", report_to=[], bf16=False, use_cpu=True, gradient_checkpointing=False,
        max_length=48, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    kwargs.update(config)
    trainer = SFTTrainer(
        model=model, args=SFTConfig(**kwargs), train_dataset=with_row_ids(train), processing_class=tok,
        compute_loss_func=compute_loss_func, formatting_func=formatting_func,
        callbacks=[LossRecorderCallback(), SnapshotCallback(steps=[1])],
    )  # fmt: skip
    trainer.train()
    return trainer


def trainer_gradients(trainer, names: list[str], plain_loss: bool = False) -> dict[int, torch.Tensor]:
    """Raw row id -> gradient of the trainer's loss on its processed row through its collator (eval mode)."""
    model = trainer.model
    params = dict(model.named_parameters())
    processed = trainer._remove_unused_columns(trainer.train_dataset)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for example in processed:
            batch = trainer._prepare_inputs(trainer.data_collator([example]))
            row = int(batch.pop(ROW_ID)[0])
            batch.pop(ROW_LABELS, None)
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss if plain_loss else trainer.compute_loss(model, batch)
            loss.backward()
            out[row] = torch.cat([params[n].grad.reshape(-1) for n in names]).detach().clone()
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return out


def check_exact(trainer, raw: Dataset, plain_loss: bool = False, pass_model: bool = False, **fmt) -> None:
    """Library gradients == the trainer's, row by row; with `pass_model`, featurize `trainer.model` in place."""
    store = RunStore.for_output_dir(trainer.args.output_dir)
    model = trainer.model if pass_model else None
    (features,) = gradient_features(store, raw, k=None, dtype="float32", model=model, progress=False, **fmt)
    reference = trainer_gradients(trainer, list(features.spec.param_names), plain_loss)
    dropped = set(range(len(raw))) - set(reference)  # rows SFTTrainer dropped (no label token left)
    ours = torch.from_numpy(features.raw())
    for row, ref in reference.items():
        g = ours[row]
        cosine = float(g @ ref / (g.norm() * ref.norm()))
        relative = float((g - ref).norm() / ref.norm())
        assert cosine >= COSINE and relative <= RELATIVE, (row, cosine, relative)
    for row in dropped:  # the trainer never trained on it: no gradient, never a made-up one
        assert not np.isfinite(features.norms[row])
    check_replay(trainer, raw, **fmt)


def check_replay(trainer, raw: Dataset, **fmt) -> None:
    """Rows prepared again from the raw dataset (as for targets and probes) == the trainer's own processed rows."""
    store = RunStore.for_output_dir(trainer.args.output_dir)
    replay = prepare_rows(raw, trainer.processing_class, load_processing(store.path), **fmt)  # not the trainer's rows
    own = trainer.train_dataset
    for row, ids in zip(own[ROW_ID], own["input_ids"]):
        assert replay[row]["input_ids"] == list(ids)
    if "labels" in own.column_names:
        for row, labels in zip(own[ROW_ID], own["labels"]):
            assert replay[row]["labels"] == list(labels)


def check_selections(trainer, raw: Dataset, targets: Dataset, pass_model: bool = False) -> None:
    selector = DataSelector.from_run(trainer.args.output_dir, dataset=raw)
    model = {"model": trainer.model} if pass_model else {}
    for method in ("less", "g2is"):
        subset = selector.select(method, budget=4, targets=targets, k=64, **model)
        assert subset.column_names == raw.column_names
        if method == "less":
            assert len(subset) == 4
        else:  # the walk may stop short on a few random-weight rows; it says so instead of padding
            assert len(subset) + selector.last.selection.info["shortfall"] == 4


FORMATS = [
    ("prompt_completion", {}),
    ("prompt_completion", {"completion_only_loss": False}),
    ("text", {}),
    ("conversational_prompt_completion", {}),
    ("messages", {}),
    ("messages", {"assistant_only_loss": True}),
    ("tokenized", {}),
]


@pytest.mark.parametrize(("fmt", "config"), FORMATS, ids=[f"{f}-{'-'.join(c) or 'default'}" for f, c in FORMATS])
def test_every_sft_format_featurizes_what_was_trained(tmp_path, chat_tok, raw_pool, fmt, config):
    raw = _as(fmt, raw_pool, chat_tok)
    trainer = _sft_run(tmp_path, build_model(chat_tok, seed=1), chat_tok, raw, **config)
    check_exact(trainer, raw)
    check_selections(trainer, raw, raw.select(range(3)))
    # SFTTrainer dropped the last row (its prompt fills max_length): the same raw rows still match the store,
    # one appended row does not
    appended = Dataset.from_list([*raw.to_list(), raw[0]])
    with pytest.raises(StoreError, match="appended"):
        DataSelector.from_run(trainer.args.output_dir, dataset=appended)


def _smoothed_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), label_smoothing=0.2)


@pytest.mark.parametrize("objective", ["label_smoothing", "compute_loss_func"])
def test_other_objectives_record_and_featurize_the_plain_loss(tmp_path, chat_tok, raw_pool, objective):
    """The trainer pops `labels` before its forward for these; the record is still the plain cross-entropy."""
    raw = _as("prompt_completion", raw_pool, chat_tok)
    model = build_model(chat_tok, seed=1)
    if objective == "label_smoothing":
        trainer = _sft_run(tmp_path, model, chat_tok, raw, label_smoothing_factor=0.1)
    else:
        trainer = _sft_run(tmp_path, model, chat_tok, raw, compute_loss_func=_smoothed_loss)
    losses = RunStore.for_output_dir(trainer.args.output_dir).load_arrays(RunStore.LOSSES)
    assert len(losses["loss"]) == 4 and np.isfinite(losses["loss"]).all()
    check_exact(trainer, raw, plain_loss=True)


@pytest.mark.parametrize("collator", ["lm", "seq2seq"])
def test_plain_trainer_on_pretokenized_rows(tmp_path, chat_tok, raw_pool, collator):
    """transformers.Trainer: its LM collator trains on the inputs (pad id masked); Seq2Seq keeps the rows' labels."""
    rows = _as("tokenized", raw_pool, chat_tok).remove_columns(["completion_mask", "task"])
    rows = rows.select(range(len(raw_pool) - 1))
    if collator == "lm":
        data_collator = DataCollatorForLanguageModeling(chat_tok, mlm=False)
    else:
        rows = rows.map(lambda r: {"labels": [-100] * 4 + r["input_ids"][4:]})
        data_collator = DataCollatorForSeq2Seq(chat_tok)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.0,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=build_model(chat_tok, seed=1), args=args, train_dataset=with_row_ids(rows),
        data_collator=data_collator, processing_class=chat_tok,
        callbacks=[LossRecorderCallback(), SnapshotCallback(steps=[1])],
    )  # fmt: skip
    trainer.train()
    check_exact(trainer, rows)
    check_selections(trainer, rows, rows.select(range(3)))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_every_family_featurizes_what_was_trained(tmp_path, chat_tok, raw_pool, family, lora):
    raw = _as("prompt_completion", raw_pool, chat_tok).select(range(6))
    model = build_family_model(family, chat_tok, seed=0)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(family)))
    # an MoE trainer adds the router's load-balancing term, a batch-level one that per-sample features leave out (its
    # share of the gradient is the coefficient's, 1e-3 to 1e-2): the reference is the trainer's loss without it
    config = {"router_aux_loss_coef": 0.0} if family in MOE_FAMILIES else {}
    trainer = _sft_run(tmp_path, model, chat_tok, raw, **config)
    # a LoRA base built from a config has no loadable weights in the store: the user passes the model
    check_exact(trainer, raw, pass_model=lora)
    check_selections(trainer, raw, raw.select(range(2)), pass_model=lora)


def test_moe_features_leave_the_router_load_balancing_term_out(tmp_path, chat_tok, raw_pool):
    """TRL adds an MoE router's load-balancing loss by default; the recorded losses and the features are those of the
    plain cross-entropy either way (the term is batch-level: a row has no share of its own)."""
    raw = _as("prompt_completion", raw_pool, chat_tok).select(range(6))
    runs = []
    for name, config in (("default", {}), ("off", {"router_aux_loss_coef": 0.0})):
        trainer = _sft_run(tmp_path / name, build_family_model("olmoe", chat_tok, seed=0), chat_tok, raw, **config)
        store = RunStore.for_output_dir(trainer.args.output_dir)
        (features,) = gradient_features(store, raw, k=None, dtype="float32", progress=False)
        runs.append((trainer, features.raw(), store.load_arrays(RunStore.LOSSES)))
    (with_term, ours, losses), (without, theirs, plain_losses) = runs
    assert with_term.aux_loss_enabled and not without.aux_loss_enabled
    np.testing.assert_array_equal(ours, theirs)
    order, plain_order = np.argsort(losses["row_id"]), np.argsort(plain_losses["row_id"])
    np.testing.assert_allclose(losses["loss"][order], plain_losses["loss"][plain_order], rtol=1e-6)
    names = [n for n, p in with_term.model.named_parameters() if p.requires_grad]
    full = trainer_gradients(with_term, names)  # the trainer's own loss, load-balancing term included
    row = next(iter(full))
    assert float((torch.from_numpy(ours[row]) - full[row]).norm() / full[row].norm()) > 1e-4  # the term was there


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_trl_defaults_and_a_passed_model_comes_back_as_it_went_in(tmp_path, chat_tok, raw_pool, lora):
    """TRL's own defaults (bf16 autocast, activation checkpointing, lr 2e-5) record; `model=` is handed back intact."""
    raw = _as("prompt_completion", raw_pool, chat_tok)
    model = build_model(chat_tok, seed=1)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = SFTConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, per_device_train_batch_size=4, max_steps=2,
        save_strategy="no", report_to=[], disable_tqdm=True,
    )  # fmt: skip
    assert args.bf16 and args.gradient_checkpointing  # the defaults this test is about
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=with_row_ids(raw), processing_class=chat_tok,
        callbacks=[LossRecorderCallback(), SnapshotCallback(steps=[1, 2])],  # step 1's weights != final weights
    )  # fmt: skip
    trainer.train()
    store = RunStore.for_output_dir(args.output_dir)
    assert np.isfinite(store.load_arrays(RunStore.LOSSES)["loss"]).all()

    model = trainer.model
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    forward = model.forward  # accelerate's bf16 autocast around the model's own
    assert "_original_forward" in model.__dict__
    base = model.get_base_model() if lora else model
    checkpointing = base.is_activation_checkpointing
    assert checkpointing
    selector = DataSelector.from_run(args.output_dir, dataset=raw)
    subset = selector.select("less", budget=3, targets=raw.select(range(2)), k=64, model=model)
    assert len(subset) == 3
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise: snapshot weights were put back
    assert [m.training for m in model.modules()] == modes
    assert base.is_activation_checkpointing == checkpointing
    assert model.forward == forward

    # through the model passed in as through one loaded from the store, the features at the last snapshot (the final
    # weights) are the fp32 gradients of the trainer's rows and loss, not those of its bf16 autocast
    (features,) = gradient_features(store, raw, k=None, steps=[2], model=trainer.model, progress=False)
    from accelerate.utils import extract_model_from_parallel

    from hf_datasel import gradient_spectra

    spectra = lambda: gradient_spectra(trainer.model, raw, chat_tok, layers=[0], store=store).metrics  # noqa: E731
    through_wrapped = spectra()
    extract_model_from_parallel(trainer.model, keep_fp32_wrapper=False)  # the plain forward again: no autocast
    for name, values in spectra().items():
        np.testing.assert_allclose(through_wrapped[name], values, rtol=1e-6, err_msg=name)
    for row, ref in trainer_gradients(trainer, list(features.spec.param_names), plain_loss=True).items():
        g = torch.from_numpy(features.raw()[row])
        assert float(g @ ref / (g.norm() * ref.norm())) >= COSINE and float((g - ref).norm() / ref.norm()) <= RELATIVE


def test_a_bf16_model_passed_in_keeps_its_features_apart(tmp_path, chat_tok, raw_pool):
    """SFTTrainer loading a Hub-style bf16 checkpoint trains bf16 weights (LoRA adapters in fp32): through that model
    the features are the model's own precision, cached apart from the store's fp32 ones and never mixed with them."""
    from hf_datasel.featurize import SpecMismatchError, check_same_space
    from hf_datasel.synthetic import save_and_reload

    raw = _as("prompt_completion", raw_pool, chat_tok)
    save_and_reload(build_model(chat_tok, seed=1), chat_tok, tmp_path / "base")
    args = SFTConfig(
        output_dir=str(tmp_path / "run"), use_cpu=True, per_device_train_batch_size=4, max_steps=1, learning_rate=0.0,
        save_strategy="no", report_to=[], disable_tqdm=True, model_init_kwargs={"dtype": torch.bfloat16},
    )  # fmt: skip
    trainer = SFTTrainer(
        model=str(tmp_path / "base"), args=args, train_dataset=with_row_ids(raw), processing_class=chat_tok,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), callbacks=[SnapshotCallback(steps=[1])],
    )  # fmt: skip
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16, torch.float32}
    trainer.train()
    store = RunStore.for_output_dir(args.output_dir)
    common = dict(k=None, dtype="float32", preconditioner="adam", progress=False)
    (passed,) = gradient_features(store, raw, model=trainer.model, **common)
    (stored,) = gradient_features(store, raw, **common)  # the store's model, loaded in fp32: not the cached bf16 set
    assert passed.meta["compute_dtype"] == "bfloat16" and stored.meta["compute_dtype"] == "float32"
    assert passed.path != stored.path and passed.path.name == f"{stored.path.name}-bfloat16"
    a, b = stored.raw(), passed.raw()
    assert not np.array_equal(a, b)
    assert (np.einsum("ij,ij->i", a, b) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() > 0.99
    with pytest.raises(SpecMismatchError, match="bfloat16.*float32|float32.*bfloat16"):
        check_same_space(passed, stored)
    selector = DataSelector.from_run(args.output_dir, dataset=raw)
    for method in ("less", "g2is"):  # the card says in which precision the features were computed
        selector.select(method, budget=3, targets=raw.select(range(2)), k=64, model=trainer.model)
        assert selector.last.selection.params["compute_dtype"] == "bfloat16"
        selector.select(method, budget=3, targets=raw.select(range(2)), k=64)
        assert selector.last.selection.params["compute_dtype"] == "float32"


def test_spectra_with_a_store_see_the_trainers_rows(tmp_path, chat_tok, raw_pool):
    """gradient_spectra(..., store=run) on raw `messages` rows == on the trainer's own processed rows."""
    from hf_datasel import gradient_spectra

    raw = _as("messages", raw_pool, chat_tok).select(range(6))
    trainer = _sft_run(tmp_path, build_model(chat_tok, seed=1), chat_tok, raw, assistant_only_loss=True)
    processed = trainer.train_dataset.sort(ROW_ID).select_columns(["input_ids", "labels"])
    common = dict(layers=[0], projections=("q", "o"))
    ours = gradient_spectra(trainer.model, raw, chat_tok, store=trainer.args.output_dir, **common)
    theirs = gradient_spectra(trainer.model, processed, None, **common)
    np.testing.assert_array_equal(ours.num_tokens, theirs.num_tokens)
    np.testing.assert_allclose(ours.metrics["nuclear_norm"], theirs.metrics["nuclear_norm"], rtol=1e-6)
    # without the store: SFTTrainer's defaults, which put every token of a `messages` row in the loss
    plain = gradient_spectra(trainer.model, raw, chat_tok, **common)
    assert (plain.num_tokens > theirs.num_tokens).all()


def test_prepared_rows_are_cached_by_dataset_processing_and_tokenizer(tmp_path, chat_tok, raw_pool, monkeypatch):
    """A second featurization of the same rows skips TRL's preparation; other rows or settings do not hit it."""
    import hf_datasel.data as data

    raw = _as("messages", raw_pool, chat_tok)
    calls = []
    original = data._sft_rows
    monkeypatch.setattr(data, "_sft_rows", lambda *a: calls.append(1) or original(*a))
    processing = data.RowProcessing(max_length=48)
    first = data.prepare_rows(raw, chat_tok, processing, cache_dir=tmp_path)
    assert data.prepare_rows(raw, chat_tok, processing, cache_dir=tmp_path) == first and len(calls) == 1
    data.prepare_rows(raw, chat_tok, processing.replace(assistant_only_loss=True), cache_dir=tmp_path)
    data.prepare_rows(raw.select(range(5)), chat_tok, processing, cache_dir=tmp_path)
    assert len(calls) == 3
    for path in tmp_path.iterdir():  # a torn cache is prepared again, never trusted
        path.write_bytes(path.read_bytes()[:40])
    assert data.prepare_rows(raw, chat_tok, processing, cache_dir=tmp_path) == first and len(calls) == 4


def test_training_rows_are_the_trainers_own(tmp_path, chat_tok, raw_pool, monkeypatch):
    """Passes over the training rows take the rows the trainer trained on; only other rows are prepared again."""
    import hf_datasel.data as data

    raw = _as("messages", raw_pool, chat_tok)
    trainer = _sft_run(tmp_path, build_model(chat_tok, seed=1), chat_tok, raw, assistant_only_loss=True)
    store = RunStore.for_output_dir(trainer.args.output_dir)
    path, processing = store.path / TRAINER_ROWS_FILE, load_processing(store.path)
    own = {
        row: (list(i), list(lab))
        for row, i, lab in zip(*(trainer.train_dataset[c] for c in (ROW_ID, "input_ids", "labels")))
    }
    dropped = len(raw) - 1  # its prompt fills max_length: SFTTrainer dropped it, so it is not in the file
    assert path.exists() and dropped not in own and len(own) == len(raw) - 1
    prepared = []
    original = data._sft_rows
    monkeypatch.setattr(data, "_sft_rows", lambda ds, *a: prepared.append(len(ds)) or original(ds, *a))

    rows = prepare_rows(raw, chat_tok, processing, trainer_rows=path)
    assert prepared == [1]  # the dropped row only
    assert all((rows[r]["input_ids"], rows[r]["labels"]) == own[r] for r in own)
    assert rows[dropped]["labels"] == [-100]  # the placeholder of a row the trainer dropped

    changed = Dataset.from_list([*raw.select(range(2)).to_list(), raw[3], *raw.select(range(3, len(raw))).to_list()])
    rows = prepare_rows(changed, chat_tok, processing, trainer_rows=path)
    assert prepared[1:] == [2]  # row 2's content is not what the trainer saw at row 2: prepared, with the dropped row
    assert rows == prepare_rows(changed, chat_tok, processing)
    assert all((rows[r]["input_ids"], rows[r]["labels"]) == own[r] for r in own if r != 2)

    shorter = processing.replace(max_length=40)  # another truncation: the trainer's rows are not these
    assert prepare_rows(raw, chat_tok, shorter, trainer_rows=path) == prepare_rows(raw, chat_tok, shorter)
    path.write_bytes(path.read_bytes()[:100])  # torn: prepared again, never trusted
    prepared.clear()
    assert prepare_rows(raw, chat_tok, processing, trainer_rows=path) == prepare_rows(raw, chat_tok, processing)
    assert prepared == [len(raw), len(raw)]


def _question_answer(example: dict) -> str:  # a user's formatting function, as older TRL scripts pass one
    return f"Q: {example['question']} A: {example['answer']}"


def _answer_question(example: dict) -> str:
    return f"A: {example['answer']} Q: {example['question']}"


def test_a_formatting_func_run_featurizes_with_the_same_function(tmp_path, chat_tok, raw_pool):
    """A run made with `formatting_func`: its rows and gradients are the trainer's once the function is passed
    again; rows the trainer never saw refuse to be guessed without it."""
    as_qa = lambda pool: Dataset.from_list(  # noqa: E731
        [{"question": r["prompt"], "answer": r["completion"], "task": r["task"]} for r in pool.to_list()]
    )
    raw, unseen = as_qa(raw_pool), as_qa(make_pool(6, noise=0.0, seed=9))
    trainer = _sft_run(tmp_path, build_model(chat_tok, seed=1), chat_tok, raw, formatting_func=_question_answer)
    check_exact(trainer, raw, formatting_func=_question_answer)  # (and the replay of every row with the function)

    store = RunStore.for_output_dir(trainer.args.output_dir)
    processing = load_processing(store.path)
    assert processing.formatting_func
    # rows the trainer never saw (targets): what an SFTTrainer with that function makes of them
    reference = SFTTrainer(
        model=trainer.model, args=trainer.args, train_dataset=with_row_ids(unseen), processing_class=chat_tok,
        formatting_func=_question_answer,
    ).train_dataset  # fmt: skip
    rows = prepare_rows(unseen, chat_tok, processing, formatting_func=_question_answer)
    assert [rows[r]["input_ids"] for r in reference[ROW_ID]] == [list(i) for i in reference["input_ids"]]
    with pytest.raises(ValueError, match="formatting_func="):
        prepare_rows(unseen, chat_tok, processing)
    mapped = unseen.map(lambda r: {"text": _question_answer(r)})  # the other way: rows mapped to text first
    assert prepare_rows(mapped, chat_tok, processing) == rows
    # the row cache keys on the function: another function is never served the first one's rows
    first = prepare_rows(unseen, chat_tok, processing, tmp_path / "cache", formatting_func=_question_answer)
    other = prepare_rows(unseen, chat_tok, processing, tmp_path / "cache", formatting_func=_answer_question)
    assert first == rows and other != rows
    assert other == prepare_rows(unseen, chat_tok, processing, formatting_func=_answer_question)

    selector = DataSelector.from_run(trainer.args.output_dir, dataset=raw)
    subset = selector.select("less", budget=4, targets=unseen, k=64, formatting_func=_question_answer)
    assert len(subset) == 4
    assert selector.last.selection.params["formatting_func"].endswith("._question_answer")
    with pytest.raises(ValueError, match="formatting_func="):
        selector.select("less", budget=4, targets=unseen, k=64)
    selector.select("g2is", budget=2, targets=unseen, k=64, formatting_func=_question_answer)
    assert selector.last.selection.params["formatting_func"].endswith("._question_answer")

    from hf_datasel import gradient_spectra, swift_study

    common = dict(layers=[0], projections=("q",), store=store)
    spectra = gradient_spectra(trainer.model, unseen, chat_tok, formatting_func=_question_answer, **common)
    as_text = gradient_spectra(trainer.model, mapped, chat_tok, **common)
    np.testing.assert_array_equal(spectra.num_tokens, as_text.num_tokens)
    np.testing.assert_allclose(spectra.metrics["nuclear_norm"], as_text.metrics["nuclear_norm"], rtol=1e-6)
    probes = unseen.add_column("strategy", ["direct", "other"] * 3)
    report = swift_study(store, probes, unseen, formatting_func=_question_answer)
    mapped_probes = probes.map(lambda r: {"text": _question_answer(r)})
    np.testing.assert_array_equal(report.scores, swift_study(store, mapped_probes, mapped).scores)


def test_the_cli_takes_the_formatting_func_by_name(tmp_path, chat_tok, raw_pool, monkeypatch):
    """`--formatting-func file.py:function` or `module:function`: the same rows and features as the function passed
    in Python; without it, or for a method that reads no text, one `error:` line."""
    from hf_datasel.featurize import FeatureSet
    from hf_datasel.hub import load_local_dataset
    from tests.test_cli import assert_user_error, invoke

    as_qa = lambda pool: Dataset.from_list(  # noqa: E731
        [{"question": r["prompt"], "answer": r["completion"]} for r in pool.to_list()]
    )
    raw, unseen = as_qa(raw_pool), as_qa(make_pool(6, noise=0.0, seed=9))
    trainer = _sft_run(tmp_path, build_model(chat_tok, seed=1), chat_tok, raw, formatting_func=_question_answer)
    run_dir, rows_file, raw_file = trainer.args.output_dir, tmp_path / "unseen.jsonl", tmp_path / "raw.jsonl"
    unseen.to_json(rows_file)
    raw.to_json(raw_file)
    (tmp_path / "user_format.py").write_text(
        "def question_answer(example):\n    return f\"Q: {example['question']} A: {example['answer']}\"\n"
    )
    monkeypatch.chdir(tmp_path)  # where a user runs the command, next to their script
    by_file = ("--formatting-func", "user_format.py:question_answer")
    result = invoke("featurize", run_dir, rows_file, "--k", "64", *by_file)
    assert result.exit_code == 0, result.output
    path = result.stdout.strip().splitlines()[-1].partition(": ")[2]
    store = RunStore.for_output_dir(run_dir)
    (ours,) = gradient_features(store, unseen, k=64, formatting_func=_question_answer, progress=False)
    np.testing.assert_array_equal(FeatureSet.open(path).raw(), ours.raw())
    assert_user_error(invoke("featurize", run_dir, rows_file, "--k", "64"), "--formatting-func")

    chosen = tmp_path / "chosen"
    by_module = ("--formatting-func", "user_format:question_answer")
    args = ("select", run_dir, raw_file, "-m", "less", "-b", "3", "--targets", rows_file, "-p", "k=64", "-o", chosen)
    result = invoke(*args, *by_module)
    assert result.exit_code == 0, result.output
    selector = DataSelector.from_run(run_dir, dataset=raw)
    expected = selector.select("less", budget=3, targets=unseen, k=64, formatting_func=_question_answer)
    assert sorted(load_local_dataset(str(chosen)).to_list(), key=str) == sorted(expected.to_list(), key=str)
    for bad, fragment in (
        ("user_format", "module:function"),
        ("user_format:nothing", "no function 'nothing'"),
        ("not_a_module_here:f", "cannot import"),
        ("missing.py:f", "no file"),
    ):
        assert_user_error(invoke(*args[:-1], tmp_path / bad.replace(":", "_"), "--formatting-func", bad), fragment)
    s2l = ("select", run_dir, raw_file, "-m", "random", "-b", "3", "-o", tmp_path / "r", *by_module)
    assert_user_error(invoke(*s2l), "takes no --formatting-func")

    from hf_datasel import gradient_spectra, swift_study

    probes = unseen.add_column("strategy", ["direct", "other"] * 3).add_column("task", ["t"] * 6)
    probes.to_json(tmp_path / "probes.jsonl")
    probes.to_json(tmp_path / "evals.jsonl")
    result = invoke("swift", run_dir, tmp_path / "probes.jsonl", tmp_path / "evals.jsonl", tmp_path / "sw", *by_module)
    assert result.exit_code == 0, result.output
    report = swift_study(store, probes, probes, formatting_func=_question_answer)
    np.testing.assert_array_equal(np.load(tmp_path / "sw" / "swift_scores.npz")["scores"], report.scores)

    trainer.save_model(tmp_path / "model")
    chat_tok.save_pretrained(tmp_path / "model")
    spectral = ("spectral", tmp_path / "model", rows_file, tmp_path / "sp", "--run-dir", run_dir, "--layers", "0")
    result = invoke(*spectral, "--projections", "q", *by_module)
    assert result.exit_code == 0, result.output
    spectra = gradient_spectra(trainer.model, unseen, chat_tok, layers=[0], projections=("q",), store=store,
                               formatting_func=_question_answer)  # fmt: skip
    spectra.report().to_csv(tmp_path / "direct.csv")
    assert (tmp_path / "sp" / "spectra_layers.csv").read_text() == (tmp_path / "direct.csv").read_text()


def test_formatting_func_for_a_run_without_one_is_refused(tmp_path, chat_tok, raw_pool):
    raw = _as("text", raw_pool, chat_tok)
    trainer = _sft_run(tmp_path, build_model(chat_tok, seed=1), chat_tok, raw)
    store = RunStore.for_output_dir(trainer.args.output_dir)
    with pytest.raises(ValueError, match="used none"):
        gradient_features(store, raw, k=64, formatting_func=_question_answer, progress=False)
