"""The embedded default: synthetic tasks, local tokenizers and tiny Llamas (no downloads)."""

from .models import LARGE, PROXY, TinyLlamaSpec, build_chat_tokenizer, build_model, build_tokenizer, save_and_reload
from .tasks import TASKS, make_pool
from .training import quiet_checkpoint_rotation, tiny_sft_config, without_log_prints

__all__ = [
    "LARGE",
    "PROXY",
    "TASKS",
    "TinyLlamaSpec",
    "build_model",
    "build_chat_tokenizer",
    "build_tokenizer",
    "make_pool",
    "save_and_reload",
    "tiny_sft_config",
    "without_log_prints",
    "quiet_checkpoint_rotation",
]
