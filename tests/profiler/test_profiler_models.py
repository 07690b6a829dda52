"""Tiny random-weight models: GQA aggregation, heads that are local by construction (a sliding
window), and a model dispatched with device_map."""

import pytest
import torch
from profiler_tiny_models import SLIDING_WINDOW, tiny_config, tiny_model

from kvc import models
from kvc.profiler import profile_model
from kvc.profiler.reference import reference_attention


def comparable(policy) -> dict:
    data = policy.to_dict()
    data.pop("created")
    for key in ("seconds", "device"):
        data["profile"].pop(key)
    data["model"].pop("source")
    data["model"].pop("name")
    return data


def test_gqa_heads_aggregate_their_query_group(tiny_llama, story_prompts):
    policy = profile_model(tiny_llama, story_prompts)
    reference = profile_model(tiny_llama, story_prompts, attention=reference_attention)
    for layer, expected_layer in zip(policy.layers, reference.layers):
        assert len(layer.heads) == 2
        for head, expected in zip(layer.heads, expected_layer.heads):
            assert [q.index for q in head.query_heads] == [2 * head.index, 2 * head.index + 1]
            for kind, recovery in expected.fastgen.items():
                assert head.fastgen[kind] == pytest.approx(recovery, abs=1e-4)
            # score-free keep-sets are the same for every query head: the KV head recovers their mean
            for kind in ("special", "special+punct"):
                mean = sum(q.fastgen[kind] for q in head.query_heads) / 2
                assert head.fastgen[kind] == pytest.approx(mean, abs=2e-6)
            assert head.sink_mass == pytest.approx(sum(q.sink_mass for q in head.query_heads) / 2, abs=2e-6)


def test_a_group_of_identical_query_heads_recovers_what_each_one_does(smollm, story_prompts):
    twin = tiny_model(tiny_config("llama", len(smollm.tokenizer)), smollm.tokenizer, "twin")
    with torch.no_grad():
        for layer in twin.model.model.layers:
            weight = layer.self_attn.q_proj.weight.view(2, 2, 16, 64)  # (kv heads, group, head dim, hidden)
            weight[:, 1] = weight[:, 0]
    policy = profile_model(twin, story_prompts)
    for layer in policy.layers:
        for head in layer.heads:
            for query in head.query_heads:
                assert query.fastgen == pytest.approx(head.fastgen, abs=2e-6)
                assert query.kind == head.kind


def test_sliding_window_heads_are_local_within_their_window(tiny_sliding, story_prompts):
    policy = profile_model(tiny_sliding, story_prompts)
    sliding, full = policy.layers
    threshold = policy.profile.threshold
    for head in sliding.heads:
        local = head.window_curves["local"]
        smallest = next(window for window, r in zip(local.points, local.recovery) if r >= threshold)
        assert smallest <= SLIDING_WINDOW and local.recovery[0] == pytest.approx(1.0, abs=1e-6)
        assert head.window_curves["special+local"].recovery[0] == pytest.approx(1.0, abs=1e-6)
    for head in full.heads:
        assert head.window_curves["local"].recovery[0] < 0.9
    assert tiny_sliding.model.config._attn_implementation == "sdpa"


def test_a_model_loaded_with_device_map(tiny_llama, story_prompts, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    loaded = models.load(str(tmp_path), dtype="float32", device="cpu", device_map="auto")
    assert comparable(profile_model(loaded, story_prompts)) == comparable(profile_model(tiny_llama, story_prompts))


def test_a_model_dispatched_across_devices_by_accelerate(smollm, tiny_llama, story_prompts, tmp_path):
    """Layer 1 is offloaded to disk: its weights reach the CPU only inside its forward, through hooks."""
    from accelerate import dispatch_model

    dispatched = tiny_model(tiny_config("llama", len(smollm.tokenizer)), smollm.tokenizer, "tiny-dispatched")
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatch_model(dispatched.model, device_map=placement, offload_dir=str(tmp_path))
    assert dispatched.model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    policy = profile_model(dispatched, story_prompts)
    assert policy.profile.device == "cpu,disk"
    assert comparable(policy) == comparable(profile_model(tiny_llama, story_prompts))
