"""LossRecorderCallback: every recorded loss is the loss of *that* raw row at *that* step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
from trl import SFTTrainer

from hf_datasel import LossRecorderCallback, RunStore, with_row_ids
from tests.conftest import sft_config


class WeightsPerStep(TrainerCallback):
    """Keeps a copy of the weights each optimizer step starts from (what its forwards used)."""

    def __init__(self):
        self.weights = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def reference_loss(model, tokenizer, prompt: str, completion: str, max_length: int) -> float:
    """Loss of one row by a plain forward: tokens of prompt+completion+EOS, loss on the completion."""
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    targets = torch.tensor(ids[1:])
    token_losses = F.cross_entropy(logits[:-1].float(), targets, reduction="none")
    return token_losses[prompt_len - 1 :].mean().item()


def pool_with_filtered_row(pool: Dataset) -> Dataset:
    rows = pool.to_list()
    rows[5] = {**rows[5], "prompt": "add " + "1" * 60 + "=", "completion": "7"}  # truncated to no completion
    return Dataset.from_list(rows)


@pytest.mark.parametrize("sampling", ["random", "group_by_length"])
def test_sft_losses_match_independent_forward(tmp_path, tokenizer, tiny_model, pool, sampling):
    raw = pool_with_filtered_row(pool)
    weights = WeightsPerStep()
    args = sft_config(
        tmp_path,
        gradient_accumulation_steps=2,
        max_steps=5,
        train_sampling_strategy=sampling,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=8,
    )
    trainer = SFTTrainer(
        model=tiny_model,
        args=args,
        train_dataset=with_row_ids(raw),
        eval_dataset=raw.select(range(8)),
        processing_class=tokenizer,
        callbacks=[LossRecorderCallback(), weights],
    )
    trainer.train()
    records = RunStore.for_output_dir(tmp_path).load_arrays("losses")

    # 5 steps x 2 micro-batches x 8 rows, every one recorded once, eval passes not recorded
    assert len(records["row_id"]) == 80
    assert 5 not in records["row_id"].tolist(), "SFTTrainer filtered row 5; nothing may be recorded for it"
    assert sorted(np.unique(records["step"]).tolist()) == [0, 1, 2, 3, 4]
    reference = type(tiny_model)(tiny_model.config)
    for row, step, loss in zip(records["row_id"], records["step"], records["loss"]):
        reference.load_state_dict(weights.weights[int(step)])
        expected = reference_loss(reference, tokenizer, raw[int(row)]["prompt"], raw[int(row)]["completion"], 32)
        assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5), (row, step)


def test_plain_trainer_with_logits(tmp_path, tokenizer, tiny_model, pool):
    """A plain transformers Trainer on a pre-tokenized dataset: the loss comes from the logits."""

    def tokenize(row):
        ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
        return {"input_ids": ids + [tokenizer.eos_token_id]}

    raw = pool.map(tokenize)
    weights = WeightsPerStep()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-3,
        save_strategy="no",
        disable_tqdm=True,
        seed=1,
    )
    trainer = Trainer(
        model=tiny_model,
        args=args,
        train_dataset=with_row_ids(raw),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[LossRecorderCallback(), weights],
    )
    trainer.train()
    records = RunStore.for_output_dir(tmp_path).load_arrays("losses")
    assert len(records["row_id"]) == 24 and len(set(records["row_id"].tolist())) == 24
    reference = type(tiny_model)(tiny_model.config)
    for row, step, loss in zip(records["row_id"], records["step"], records["loss"]):
        reference.load_state_dict(weights.weights[int(step)])
        ids = torch.tensor([raw[int(row)]["input_ids"]])
        with torch.no_grad():
            expected = reference(input_ids=ids, labels=ids).loss.item()  # all tokens are labels here
        assert loss == pytest.approx(expected, rel=1e-4)


def test_resume_from_checkpoint_keeps_every_record_once(tmp_path, tokenizer, pool):
    from hf_datasel.synthetic import build_model

    def run(out, max_steps, resume=None):
        args = sft_config(out, max_steps=max_steps, save_strategy="steps", save_steps=2)
        trainer = SFTTrainer(
            model=build_model(tokenizer, seed=0),
            args=args,
            train_dataset=with_row_ids(pool),
            processing_class=tokenizer,
            callbacks=[LossRecorderCallback()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return RunStore.for_output_dir(out).load_arrays("losses")

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 6)  # a full run whose later records must be replaced on resume
    resumed = run(tmp_path / "resumed", 6, resume=str(tmp_path / "resumed" / "checkpoint-4"))
    assert np.array_equal(straight["row_id"], resumed["row_id"])
    assert np.array_equal(straight["step"], resumed["step"])
    np.testing.assert_allclose(straight["loss"], resumed["loss"], rtol=1e-5)


def test_sweeps_at_listed_steps_match_the_weights_of_that_step(tmp_path, tokenizer, tiny_model, pool):
    """Sweeps run at listed steps even when no checkpoint is saved there (save_strategy="no")."""
    weights = WeightsPerStep()
    args = sft_config(tmp_path, max_steps=4)
    trainer = SFTTrainer(
        model=tiny_model,
        args=args,
        train_dataset=with_row_ids(pool),
        processing_class=tokenizer,
        callbacks=[LossRecorderCallback(sweep_steps=[2, 4], sweep_batch_size=13), weights],
    )
    trainer.train()
    sweep = RunStore.for_output_dir(tmp_path).load_arrays("sweep")
    assert sweep["steps"].tolist() == [2, 4] and sweep["row_id"].tolist() == list(range(len(pool)))
    at_step_2 = type(tiny_model)(tiny_model.config)
    at_step_2.load_state_dict(weights.weights[2])  # the weights after 2 updates
    for row in (0, 17, 95):
        prompt, completion = pool[row]["prompt"], pool[row]["completion"]
        assert sweep["loss"][0, row] == pytest.approx(
            reference_loss(at_step_2, tokenizer, prompt, completion, 32), rel=1e-4
        )
        assert sweep["loss"][1, row] == pytest.approx(
            reference_loss(tiny_model, tokenizer, prompt, completion, 32), rel=1e-4
        )
    assert tiny_model.training, "the sweep must put the model back in training mode"


def test_refuses_packing_and_missing_row_ids(tmp_path, tokenizer, tiny_model, pool):
    with pytest.raises(ValueError, match="packing"):
        SFTTrainer(
            model=tiny_model,
            args=sft_config(tmp_path, packing=True),
            train_dataset=with_row_ids(pool),
            processing_class=tokenizer,
            callbacks=[LossRecorderCallback()],
        )
    with pytest.raises(ValueError, match="with_row_ids"):
        SFTTrainer(
            model=tiny_model,
            args=sft_config(tmp_path),
            train_dataset=pool,
            processing_class=tokenizer,
            callbacks=[LossRecorderCallback()],
        )


def test_nan_loss_is_recorded_as_nan_not_a_number():
    from types import SimpleNamespace

    from hf_datasel.record import per_sample_loss

    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, 4], [-100, -100, -100, -100]])
    loss = per_sample_loss(SimpleNamespace(logits=logits), labels=labels)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0])
    expected = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert loss[0].item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_batch_without_labels_is_refused_with_what_to_use(tiny_model):
    """Sweeps and evaluation read losses from plain logits: a batch without labels says so, not a shape error."""
    from types import SimpleNamespace

    from hf_datasel.record.per_sample_loss import forward_at_labels, per_sample_loss, row_losses

    ids = torch.randint(1, tiny_model.config.vocab_size, (2, 6))
    with torch.no_grad():
        outputs, kept = forward_at_labels(tiny_model, {"input_ids": ids}, None)
    assert kept is None
    for call in (lambda: row_losses(outputs.logits, None), lambda: per_sample_loss(SimpleNamespace(logits=ids))):
        with pytest.raises(ValueError, match="needs `labels`.*collator that makes them"):
            call()


def test_losses_at_label_positions_equal_those_of_every_position(tiny_model):
    """Sweeps, evaluation and spectra ask the model for the logits of the label positions only (each row's own):
    the same per-row losses as from every position's logits, and a model without `logits_to_keep` gets them all."""
    from types import SimpleNamespace

    from hf_datasel.record.per_sample_loss import forward_at_labels, per_sample_loss, row_losses

    torch.manual_seed(0)
    ids = torch.randint(1, tiny_model.config.vocab_size, (3, 10))
    labels = ids.clone()
    labels[:, :6] = -100
    labels[1, 6:8] = -100
    labels[2] = -100  # no label: NaN, never a number
    tiny_model.eval()
    with torch.no_grad():
        outputs, kept = forward_at_labels(tiny_model, {"input_ids": ids}, labels)
        assert kept is not None and outputs.logits.shape[1] == 4 < ids.shape[1]  # the most label tokens of a row
        ours = row_losses(outputs.logits, labels, kept)[0]
        full = per_sample_loss(tiny_model(input_ids=ids), labels=labels)
    torch.testing.assert_close(ours[:2], full[:2], rtol=1e-5, atol=1e-6)
    assert torch.isnan(ours[2]) and torch.isnan(full[2])

    class Plain(torch.nn.Module):  # a forward without logits_to_keep
        def forward(self, input_ids):
            return SimpleNamespace(logits=tiny_model(input_ids=input_ids).logits)

    with torch.no_grad():
        outputs, kept = forward_at_labels(Plain(), {"input_ids": ids}, labels)
    assert kept is None and outputs.logits.shape[1] == ids.shape[1]


def test_sft_config_defaults_bf16_and_activation_checkpointing(tmp_path, tokenizer, tiny_model, pool):
    """SFTConfig's own defaults (bf16 autocast, gradient checkpointing) as a user's script would have them."""
    from trl import SFTConfig

    weights = WeightsPerStep()
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True)
    assert args.bf16 and args.gradient_checkpointing
    trainer = SFTTrainer(
        model=tiny_model,
        args=args,
        train_dataset=with_row_ids(pool),
        processing_class=tokenizer,
        callbacks=[LossRecorderCallback(), weights],
    )
    trainer.train()
    records = RunStore.for_output_dir(tmp_path).load_arrays("losses")
    assert len(records["row_id"]) == 16 == len(set(records["row_id"].tolist()))
    reference = type(tiny_model)(tiny_model.config)
    for row, step, loss in zip(records["row_id"], records["step"], records["loss"]):
        reference.load_state_dict(weights.weights[int(step)])
        expected = reference_loss(reference, tokenizer, pool[int(row)]["prompt"], pool[int(row)]["completion"], 1024)
        assert loss == pytest.approx(expected, rel=2e-2)  # bf16 autocast vs an fp32 reference


def test_callback_added_after_init_needs_its_trainer(tmp_path, tokenizer, tiny_model, pool):
    trainer = SFTTrainer(
        model=tiny_model,
        args=sft_config(tmp_path, max_steps=1),
        train_dataset=with_row_ids(pool),
        processing_class=tokenizer,
    )
    trainer.add_callback(LossRecorderCallback())
    with pytest.raises(RuntimeError, match="trainer=trainer"):
        trainer.train()
    trainer.remove_callback(LossRecorderCallback)
    recorder = LossRecorderCallback(trainer=trainer)
    trainer.add_callback(recorder)
    trainer.train()
    assert len(RunStore.for_output_dir(tmp_path).load_arrays("losses")["row_id"]) == 8
