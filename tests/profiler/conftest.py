"""Profiler fixtures: tiny random-weight models (GQA Llama, sliding-window Qwen2) that share the
embedded model's tokenizer, and short prompts that are not from the evaluation texts."""

import pytest
from profiler_tiny_models import SLIDING_WINDOW, STORY, tiny_config, tiny_model

from kvc.profiler.prompts import Prompt, PromptSet


@pytest.fixture(scope="session")
def tiny_llama(smollm):
    """A 2-layer Llama with 4 query heads over 2 KV heads (groups of 2), random weights."""
    return tiny_model(tiny_config("llama", len(smollm.tokenizer)), smollm.tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_sliding(smollm):
    """A 2-layer Qwen2 whose layer 0 attends through a 16-token sliding window, layer 1 fully."""
    config = tiny_config(
        "qwen2", len(smollm.tokenizer), use_sliding_window=True, sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )
    return tiny_model(config, smollm.tokenizer, "tiny-sliding")


@pytest.fixture(scope="session")
def story_prompts():
    """Two short prompts (about 100 and 60 tokens): a text and a chat."""
    return PromptSet("story", (
        Prompt("ledger", text=STORY),
        Prompt("chat", messages=(("user", "Summarise this in one sentence: " + STORY[:200]),)),
    ))
