"""Exact per-sample gradients on every common causal-LM family, full and LoRA, against one-row autograd.

The reference for each row is the model's own loss on that row alone (a batch of one, no padding,
no position ids), backpropagated by plain autograd. The engine gets the rows together in one
padded batch (right and left padding) and must give each row's gradient of every trainable
parameter. The second half crafts modules whose per-sample gradient cannot be had and checks
that the engine raises instead of returning numbers.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_datasel.featurize.grads import IN_OUT, OUT_IN, PerSampleGradientError, PerSampleGradients, _linear_layout
from hf_datasel.synthetic.families import FAMILIES, MOE_FAMILIES, build_family_model, lora_targets

# (prompt, completion) pairs of different lengths; the prompt's tokens are labelled -100.
PAIRS = [
    ("Q: add 3 4\nA: ", "7"),
    ("Q: reverse abcdef\nA: ", "fedcba"),
    ("Q: x\nA: ", "yes, it is"),
    ("Q: count to five\nA: ", "1 2 3 4 5"),
]
COSINE, RELATIVE_ERROR = 0.9999, 1e-3


@pytest.fixture(scope="session")
def family_rows(tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) per row, prompt tokens labelled -100."""
    rows = []
    for prompt, completion in PAIRS:
        ids = tokenizer(prompt + completion)["input_ids"]
        n_prompt = len(tokenizer(prompt)["input_ids"])
        labels = [-100] * n_prompt + ids[n_prompt:]
        rows.append((torch.tensor(ids), torch.tensor(labels)))
    assert len({len(ids) for ids, _ in rows}) == len(rows)
    return rows


def _pad(rows, pad_token_id: int, side: str) -> dict[str, torch.Tensor]:
    """A padded batch: pad tokens masked out of attention and labelled -100."""
    width = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        n = width - len(ids)
        parts = {
            "input_ids": (ids, torch.full((n,), pad_token_id)),
            "attention_mask": (torch.ones_like(ids), torch.zeros(n, dtype=torch.long)),
            "labels": (labels, torch.full((n,), -100)),
        }
        for key, (real, pad) in parts.items():
            batch[key].append(torch.cat([real, pad] if side == "right" else [pad, real]))
    return {k: torch.stack(v) for k, v in batch.items()}


def _model(family: str, tokenizer, lora: bool) -> nn.Module:
    model = build_family_model(family, tokenizer, seed=0)
    if lora:
        from peft import LoraConfig, get_peft_model

        # init_lora_weights=False: B is random too, so LoRA A's gradient is not identically zero.
        config = LoraConfig(r=4, target_modules=lora_targets(family), init_lora_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's note that GPT-2's Conv1D needs fan_in_fan_out
            model = get_peft_model(model, config)
    return model.eval()


def _reference(model: nn.Module, rows, names: list[str]) -> torch.Tensor:
    """(N, P): each row alone through the model's own loss and autograd, gradients concatenated in `names` order."""
    params = dict(model.named_parameters())
    out = []
    for ids, labels in rows:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], labels=labels[None]).loss.backward()
        out.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


@pytest.fixture(scope="session")
def family_case(tokenizer, family_rows):
    """(model, engine, reference) per (family, lora), built once for the session."""

    @functools.cache
    def case(family: str, lora: bool):
        model = _model(family, tokenizer, lora)
        engine = PerSampleGradients(model)
        return model, engine, _reference(model, family_rows, engine.param_names)

    return case


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_gradients_equal_one_row_autograd(tokenizer, family_rows, family_case, family, lora, padding_side):
    model, engine, reference = family_case(family, lora)
    assert engine.param_names == [n for n, p in model.named_parameters() if p.requires_grad]
    if lora:
        assert all("lora_" in n for n in engine.param_names)
    grads, loss, valid = engine(**_pad(family_rows, tokenizer.pad_token_id, padding_side))
    assert valid.all() and set(grads) == set(engine.param_names)
    got = torch.cat([grads[n].reshape(len(family_rows), -1) for n in engine.param_names], dim=1)
    assert reference.norm(dim=1).min() > 0
    cosine = F.cosine_similarity(got.double(), reference.double(), dim=1)
    relative = (got - reference).double().norm(dim=1) / reference.double().norm(dim=1)
    assert cosine.min() >= COSINE, f"cosine per row {cosine.tolist()}"
    assert relative.max() <= RELATIVE_ERROR, f"relative error per row {relative.tolist()}"
    # and parameter by parameter: a small one (a norm's weight) would hide in the whole row; one whose true
    # gradient is zero (OPT's k_proj bias: softmax ignores it) is held to a thousandth of the row's norm
    start, floor = 0, 1e-3 * reference.double().norm(dim=1)
    for name in engine.param_names:
        width = grads[name][0].numel()
        ref = reference[:, start : start + width].double()
        error = (got[:, start : start + width].double() - ref).norm(dim=1) / torch.maximum(ref.norm(dim=1), floor)
        assert float(error.max()) <= RELATIVE_ERROR, (name, error.tolist())
        start += width


@pytest.mark.parametrize(
    "family, adapter, variant_parameter",
    [
        ("llama", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}, "lora_magnitude_vector"),
        ("gpt2", {"target_modules": ["wte", "wpe", "c_attn"]}, "lora_embedding_A"),
        ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head", "embed_tokens"]}, "modules_to_save"),
        ("gpt2", {"target_modules": ["c_attn", "c_proj"], "use_rslora": True, "bias": "lora_only"}, "bias"),
        ("gpt2", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, "lora_A"),
        (
            "llama",
            {"ia3": True, "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
            "ia3_l",
        ),
    ],
    ids=["dora", "lora-on-embeddings", "modules-to-save", "rslora-bias", "conv1d-fan-in-fan-out", "ia3"],
)
def test_adapter_variants(tokenizer, family_rows, family, adapter, variant_parameter):
    """DoRA (its adapters also applied to an identity matrix, for a detached weight norm: not a row), LoRA
    on embeddings (adapter weights in ParameterDicts, used by the module that holds them), full copies of the
    LM head and embeddings next to LoRA (`modules_to_save`), rsLoRA with trained biases, GPT-2's Conv1D with
    `fan_in_fan_out`, and IA³ (learned scales on a layer's input or output)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    adapter = dict(adapter)
    if adapter.pop("ia3", False):
        config = IA3Config(**adapter)
    else:
        config = LoraConfig(r=4, init_lora_weights=False, **adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build_family_model(family, tokenizer, seed=0), config).eval()
    engine = PerSampleGradients(model)
    assert any(variant_parameter in n for n in engine.param_names)
    reference = _reference(model, family_rows, engine.param_names)
    grads, _, valid = engine(**_pad(family_rows, tokenizer.pad_token_id, "left"))
    got = torch.cat([grads[n].reshape(len(family_rows), -1) for n in engine.param_names], dim=1)
    relative = (got - reference).double().norm(dim=1) / reference.double().norm(dim=1)
    assert valid.all() and relative.max() <= RELATIVE_ERROR, f"relative error per row {relative.tolist()}"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mixture_of_experts_per_sample_gradients_equal_one_row_autograd(tokenizer, family_rows, family, lora):
    """Full fine-tuning of an MoE model (a top-k router returning (logits, scores, indices); fused 3-D expert
    weights, each token through its top-k experts), and LoRA on its attention: exact, row by row."""
    model = _model(family, tokenizer, lora)
    engine = PerSampleGradients(model)
    if not lora:
        shapes = {n: model.get_parameter(n).shape for n in engine.param_names}
        assert any(n.endswith("mlp.gate.weight") for n in shapes)  # the routers
        assert any("experts" in n and len(shape) == 3 for n, shape in shapes.items())
    reference = _reference(model, family_rows, engine.param_names)
    grads, _, valid = engine(**_pad(family_rows, tokenizer.pad_token_id, "right"))
    got = torch.cat([grads[n].reshape(len(family_rows), -1) for n in engine.param_names], dim=1)
    relative = (got - reference).double().norm(dim=1) / reference.double().norm(dim=1)
    assert valid.all() and relative.max() <= RELATIVE_ERROR, f"relative error per row {relative.tolist()}"
    if not lora:  # each router's own gradient too, not only the total
        for n in (n for n in engine.param_names if n.endswith("mlp.gate.weight")):
            index = engine.param_names.index(n)
            start = sum(model.get_parameter(m).numel() for m in engine.param_names[:index])
            ref = reference[:, start : start + model.get_parameter(n).numel()]
            assert ref.norm() > 0
            torch.testing.assert_close(
                grads[n].reshape(len(family_rows), -1), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item()
            )


# -- linear modules are recognised by what they compute --------------------------------------
class _FalconStyleLinear(nn.Linear):
    """An nn.Linear subclass that overrides forward but is still x Wᵀ + b (like FalconLinear)."""

    def forward(self, input):
        return input @ self.weight.T + self.bias


class _ScaledLinear(nn.Linear):
    """An nn.Linear subclass that is not x Wᵀ + b: must take the generic path."""

    def forward(self, input):
        return torch.tanh(super().forward(input))


def test_linear_layout_is_found_by_probing_not_by_name():
    assert _linear_layout(nn.Linear(3, 5)) == OUT_IN
    assert _linear_layout(Conv1D(5, 3)) == IN_OUT
    assert _linear_layout(_FalconStyleLinear(4, 4)) == OUT_IN
    assert _linear_layout(_ScaledLinear(3, 5)) is None
    assert _linear_layout(nn.Embedding(7, 3)) is None


# -- modules whose per-sample gradient cannot be had: the engine raises ------------------------
class _Toy(nn.Module):
    """Embedding -> `middle` -> LM head; `middle(hidden, toy)` may do anything."""

    def __init__(self, middle: Callable[[torch.Tensor, nn.Module], torch.Tensor]):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7)
        self.middle = middle

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return SimpleNamespace(logits=self.head(self.middle(self.emb(input_ids), self)))


class _MixRows(nn.Module):
    """Adds the batch mean: every row's output depends on the other rows."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, hidden):
        return hidden + self.weight * hidden.mean(0, keepdim=True)


class _SharedTable(nn.Module):
    """A learned position table built once for the whole batch, (1, T, d) (GPT-2 without position ids)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 4))

    def forward(self, tokens: int):
        return self.weight[:tokens][None]


class _Broadcast(nn.Module):
    """An output with the batch as its leading dimension, but computed from no per-row input."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, rows: int, tokens: int):
        return self.weight.expand(rows, tokens, 4)


class _TupleMixRows(_MixRows):
    """Two outputs, the first of which mixes rows (as a tuple-returning module, e.g. an MoE router, might)."""

    def forward(self, hidden):
        return hidden + self.weight * hidden.mean(0, keepdim=True), hidden * self.weight


class _DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, hidden):
        return {"out": hidden * self.weight}


def _mix(hidden, toy):
    return toy.mix(hidden)


def _tuple_mix(hidden, toy):
    mixed, plain = toy.mix(hidden)
    return mixed + plain


def _dict_output(hidden, toy):
    return toy.named(hidden)["out"]


def _table(hidden, toy):
    return hidden + toy.table(hidden.shape[1])


def _broadcast(hidden, toy):
    return hidden + toy.broadcast(hidden.shape[0], hidden.shape[1])


def _sequence_first(hidden, toy):
    return toy.proj(hidden.transpose(0, 1)).transpose(0, 1)  # a Linear on a (T, B, d) input


def _weight_read_directly(hidden, toy):
    return F.linear(hidden, toy.proj.weight)  # proj's weight used without calling proj


@pytest.mark.parametrize(
    "middle, extra, message",
    [
        (_mix, {"mix": _MixRows()}, "mixes rows"),
        (_tuple_mix, {"mix": _TupleMixRows()}, "mixes rows"),
        (_dict_output, {"named": _DictOutput()}, "not tensors"),
        (_table, {"table": _SharedTable()}, "leading dimension"),
        (_broadcast, {"broadcast": _Broadcast()}, "no argument"),
        (_sequence_first, {"proj": nn.Linear(4, 4)}, "leading dimension"),
        (_weight_read_directly, {"proj": nn.Linear(4, 4)}, "outside the forward"),
    ],
    ids=[
        "mixes-rows",
        "tuple-mixes-rows",
        "dict-output",
        "shared-positions",
        "no-batched-argument",
        "sequence-first",
        "weight-read-directly",
    ],
)
def test_engine_raises_when_a_per_sample_gradient_cannot_be_had(middle, extra, message):
    torch.manual_seed(0)
    toy = _Toy(middle)
    for name, module in extra.items():
        toy.add_module(name, module)
    ids = torch.randint(0, 7, (3, 5))
    with pytest.raises(PerSampleGradientError, match=message):
        PerSampleGradients(toy)(ids, torch.ones_like(ids), ids.clone())
    assert all(not m._forward_hooks for m in toy.modules())  # hooks removed even on error


def test_a_module_that_mixes_rows_is_caught_after_a_first_batch_of_one_row():
    """One row cannot show that a module mixes rows; the check waits for a batch that can."""
    torch.manual_seed(0)
    toy = _Toy(_mix)
    toy.add_module("mix", _MixRows())
    engine = PerSampleGradients(toy)
    one = torch.randint(0, 7, (1, 5))
    engine(one, torch.ones_like(one), one.clone())  # exact: a batch of one is the row alone
    ids = torch.randint(0, 7, (3, 5))
    with pytest.raises(PerSampleGradientError, match="mixes rows"):
        engine(ids, torch.ones_like(ids), ids.clone())
