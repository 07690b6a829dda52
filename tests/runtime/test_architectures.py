"""The runtime across architectures that use transformers' attention interface: tiny random Llama,
Mistral (every layer a sliding window), Qwen2 (mixed full and sliding layers) and Gemma 3 (alternating
sliding and full layers, its own attention scaling). A keep-everything plan reproduces DynamicCache,
sliding windows included; a compressed plan allocates exactly its bytes."""

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import kvc
from kvc.models import LoadedModel, fingerprint
from kvc.runtime.apply import cache_keyword, sliding_windows
from kvc.runtime.handmade import handmade_plan

WINDOW = 8
GEOMETRY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "vocab_size": 49152}

ARCHITECTURES = {
    "llama": lambda: (LlamaConfig(**GEOMETRY), LlamaForCausalLM),
    "mistral": lambda: (MistralConfig(sliding_window=WINDOW, **GEOMETRY), MistralForCausalLM),
    "qwen2": lambda: (Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **GEOMETRY),
                      Qwen2ForCausalLM),
    "gemma3": lambda: (Gemma3TextConfig(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                                        query_pre_attn_scalar=24, **GEOMETRY), Gemma3ForCausalLM),
}
EXPECTED_WINDOWS = {"llama": [None, None], "mistral": [WINDOW, WINDOW], "qwen2": [None, WINDOW],
                    "gemma3": [WINDOW, None]}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def tiny(request, smollm):
    torch.manual_seed(0)
    config, model_class = ARCHITECTURES[request.param]()
    config._attn_implementation = "sdpa"
    model = model_class(config).eval()
    return request.param, LoadedModel(model, smollm.tokenizer, None, fingerprint(model.config, smollm.tokenizer))


def greedy(model, input_ids, cache, new_tokens=10):
    with torch.no_grad():
        return model.generate(input_ids, **{cache_keyword(model): cache}, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0)


def test_sliding_windows_are_read_from_the_config(tiny):
    name, loaded = tiny
    assert sliding_windows(loaded.model.config) == EXPECTED_WINDOWS[name]


def test_full_plan_reproduces_dynamic_cache(tiny, smollm):
    name, loaded = tiny
    model = loaded.model
    plan = handmade_plan(model.config, loaded.tokenizer, "full", 64)
    input_ids = smollm.tokenizer("Tiny models read this sentence, twice: tiny models read it.",
                                 return_tensors="pt").input_ids
    assert input_ids.shape[1] > WINDOW
    reference = greedy(model, input_ids, DynamicCache(config=model.config))
    with kvc.apply(loaded, plan) as applied:
        cache = applied.cache()
        compressed = greedy(model, input_ids, cache)
    assert torch.equal(compressed.sequences, reference.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(compressed.logits, reference.logits)) < 1e-4
    assert cache.nbytes() == plan.cache_bytes
    for layer, window in enumerate(EXPECTED_WINDOWS[name]):  # a full head on a sliding layer keeps the window
        expected = window - 1 if window else input_ids.shape[1] + 9  # (the next token is the window's last)
        assert [len(p) for p in cache.kept_positions(layer)] == [expected] * 2


def test_compressed_plan_runs_within_its_bytes(tiny, smollm):
    _, loaded = tiny
    model = loaded.model
    plan = handmade_plan(model.config, loaded.tokenizer, [["special+punct+frequency+local", "special+local"]] * 2,
                         64, class_slots=4, heavy=4, window=4)
    input_ids = smollm.tokenizer("Commas, colons: and full stops. Then more words follow here, and here.",
                                 return_tensors="pt").input_ids
    with kvc.apply(loaded, plan) as applied:
        cache = applied.cache()
        output = greedy(model, input_ids, cache, new_tokens=6)
    assert cache.nbytes() == plan.cache_bytes
    assert all(torch.isfinite(logits).all() for logits in output.logits)
    for layer in range(2):
        assert all(len(kept) <= slots for kept, slots in zip(cache.kept_positions(layer), plan.capacity[layer].tolist()))
