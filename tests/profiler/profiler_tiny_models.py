"""Tiny random-weight models for profiler tests, sharing the embedded model's tokenizer, and a
short story that is not from the evaluation texts."""

import torch

from kvc.models import LoadedModel, ModelSource, fingerprint

SLIDING_WINDOW = 16

STORY = (
    "The harbour master kept a ledger of every boat that came in: its name, its cargo, the hour, and the "
    "weather. On calm days the entries were short. When a storm came, she wrote more: which moorings held, "
    "which ropes frayed, who helped whom. Years later her grandson read the ledgers and found, between the "
    "tides and the tonnage, a history of the village that nobody had meant to write. He copied the best "
    "pages into a notebook, added the names of the people in them, and gave it to the school."
)


def tiny_config(architecture: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    shape = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
        "initializer_range": 0.3, "tie_word_embeddings": True,
    }
    return (LlamaConfig if architecture == "llama" else Qwen2Config)(**{**shape, **overrides})


def tiny_model(config, tokenizer, name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel(model, tokenizer, ModelSource(name, "dir", name), fingerprint(config, tokenizer))
