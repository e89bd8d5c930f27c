"""The embedded default: tokenizers trained here with `tokenizers`, tiny Llamas built from configs.

Nothing is downloaded; models and tokenizers are saved to folders and loaded back with the
ordinary `from_pretrained`, the same code path a Hub id takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .tasks import corpus

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


def build_tokenizer(vocab_size: int | None = None, seed: int = 0) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on the synthetic corpus.

    `vocab_size=None` keeps only the characters (a character-level tokenizer); a larger size
    adds merges, so two models can have genuinely different vocabularies.
    """
    texts = corpus(seed)
    alphabet = sorted(set("".join(texts)))
    specials = list(SPECIAL_TOKENS.values())
    size = len(alphabet) + len(specials) if vocab_size is None else vocab_size
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Merges never cross "=", "+" or a space, so a prompt tokenizes the same alone as in front of
    # its completion (the labels of training and the context of generation then agree).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[=+ ]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


# A ChatML-like template with `{% generation %}` markers, so `assistant_only_loss` works as on Hub models.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_chat_tokenizer(vocab_size: int | None = None, seed: int = 0) -> PreTrainedTokenizerFast:
    """`build_tokenizer` as Hub chat models have it: a post-processor that adds BOS, and a chat template.

    Users' tokenizers (Llama, Mistral, Gemma) add BOS when called with special tokens, as TRL calls
    them; this is the tokenizer tests use to check that every pass sees what the trainer trained on.
    """
    tok = build_tokenizer(vocab_size, seed)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]})
    bos = SPECIAL_TOKENS["bos_token"]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclass(frozen=True)
class TinyLlamaSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 64
    vocab_size: int | None = None  # None: the tokenizer's size; larger pads it (a real tokenizer's LM head)


PROXY = TinyLlamaSpec()
LARGE = TinyLlamaSpec(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256)


def build_model(tokenizer: PreTrainedTokenizerFast, spec: TinyLlamaSpec = PROXY, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama sized for `tokenizer` (deterministic under `seed`)."""
    config = LlamaConfig(
        vocab_size=max(spec.vocab_size or 0, len(tokenizer)),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_and_reload(model, tokenizer, path: str | os.PathLike):
    """Write model and tokenizer to `path` and load them back the way a Hub id would be."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
