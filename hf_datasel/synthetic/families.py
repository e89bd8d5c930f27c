"""Tiny configs of transformers' common causal-LM families, for tests and benchmarks.

Each model is built from its config (nothing is downloaded) with a few layers and small widths,
keeping what makes the family different: fused q/k/v (GPT-2 `c_attn`, GPT-NeoX and Bloom
`query_key_value`, Phi-3 and CodeGen `qkv_proj`, MPT `Wqkv`), Conv1D weights (GPT-2), grouped-query
and multi-query attention (Llama, Qwen, Mistral, Gemma, Phi-3, StableLM, StarCoder2, Granite,
Cohere; GPT-BigCode), learned positions (GPT-2, OPT, GPT-BigCode), ALiBi (Bloom, MPT), partial rotary
embeddings (Phi, StableLM), layers that see inputs flattened over batch and tokens (OPT),
soft-capping and sliding windows (Gemma 2/3), top-k routed experts with fused 3-D expert weights
(Mixtral, Qwen3-MoE, OLMoE; Qwen2-MoE with a gated shared expert).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

FAMILIES = (
    "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "phi",
    "gpt2", "gpt_neox", "opt", "falcon", "olmo2", "bloom", "gpt_bigcode", "mpt", "codegen",
    "stablelm", "starcoder2", "granite", "cohere",
)  # fmt: skip
# Mixture-of-experts families: top-k routers returning (logits, scores, indices), fused 3-D expert weights.
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe")
_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}

# LoRA target modules per family: attention projections under their own names.
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "opt": ["q_proj", "v_proj", "out_proj"],
    "falcon": ["query_key_value", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "v_proj", "dense"],
    "bloom": ["query_key_value", "dense"],
    "gpt_bigcode": ["c_attn", "c_proj"],
    "mpt": ["Wqkv", "out_proj"],
    "codegen": ["qkv_proj", "out_proj"],
}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

_HIDDEN, _LAYERS, _HEADS, _KV_HEADS, _FFN, _POSITIONS = 32, 2, 4, 2, 64, 128


def family_config(
    family: str,
    vocab_size: int,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
):
    """A tiny fp32 config of `family` (a `model_type`) for a tokenizer of `vocab_size` tokens."""
    if family not in FAMILIES + MOE_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES + MOE_FAMILIES}")
    ids = {"pad_token_id": pad_token_id, "eos_token_id": eos_token_id, "bos_token_id": bos_token_id}
    ids = {k: v for k, v in ids.items() if v is not None}
    if family in ("gpt2", "gpt_bigcode", "codegen"):
        kw = dict(n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, n_positions=_POSITIONS, n_inner=_FFN)
        kw.update({"gpt_bigcode": dict(multi_query=True), "codegen": dict(rotary_dim=4)}.get(family, {}))
    elif family == "bloom":
        kw = dict(hidden_size=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS)
    elif family == "mpt":
        kw = dict(d_model=_HIDDEN, n_layers=_LAYERS, n_heads=_HEADS, expansion_ratio=_FFN // _HIDDEN)
        kw["max_seq_len"] = _POSITIONS
    elif family == "opt":
        kw = dict(
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            ffn_dim=_FFN,
            max_position_embeddings=_POSITIONS,
            word_embed_proj_dim=_HIDDEN,
        )
    elif family == "gpt_neox":
        kw = dict(
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            intermediate_size=_FFN,
            max_position_embeddings=_POSITIONS,
            rotary_pct=0.5,
        )
    elif family == "falcon":
        kw = dict(
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            new_decoder_architecture=True,
            num_kv_heads=_KV_HEADS,
            ffn_hidden_size=_FFN,
        )
    else:
        kw = dict(
            hidden_size=_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=_KV_HEADS,
            intermediate_size=_FFN,
            max_position_embeddings=_POSITIONS,
        )
        if family in ("gemma", "gemma2", "gemma3_text", "qwen3", "qwen3_moe"):
            kw["head_dim"] = _HIDDEN // _HEADS
        if family == "phi":
            kw["partial_rotary_factor"] = 0.5
        kw.update(_MOE.get(family, {}))
        if family in ("gemma2", "gemma3_text"):
            kw["sliding_window"] = 16
    config = AutoConfig.for_model(family, vocab_size=vocab_size, **kw, **ids)
    config._attn_implementation = "eager" if family in ("gemma2", "gemma3_text", "bloom", "mpt") else "sdpa"
    return config


def build_family_model(family: str, tokenizer, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny `family` model sized for `tokenizer` (deterministic under `seed`)."""
    config = family_config(
        family, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def lora_targets(family: str) -> list[str]:
    """Module names a LoRA adapter of `family` targets (its attention projections)."""
    return LORA_TARGETS.get(family, DEFAULT_LORA_TARGETS)
