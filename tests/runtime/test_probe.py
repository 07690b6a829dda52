"""Probes after a context (`kvc.runtime.probe`): the probe's queries pick the frequency heads' tokens
as a hand-written SnapKV score says, the probe itself never enters the cache, a question's positions
continue from the context's end, a member of a shared prefill that does not score by probes ends
as a prefill of the context alone would leave it, and a merging plan merges into the recent window
only in a context prefilled before its questions."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvc
from kvc.policies.errors import KvcError
from kvc.runtime.apply import cache_keyword
from kvc.runtime.cache import CompressedCache
from kvc.runtime.handmade import handmade_plan
from kvc.runtime.kernels import observation_scores_reference
from kvc.runtime import probe as probe_module
from kvc.policies.probes import PROBES, check_probe
from kvc.runtime.probe import make_probe, prefill_context
from kvc.runtime.shared_prefill import SharedPrefill
from tests.runtime.test_step import tiny_llama

CONTEXT = ("The lighthouse keeper counted ships, storms and gulls. Her brother, a baker in the town, sent bread "
           "every Tuesday; the code of the gate was 4417. Nobody else climbed the stairs, except the cat.")


def peaked_llama(tokenizer):
    """The tiny Llama with sharper attention: which tokens a query picks depends on what it reads."""
    loaded = tiny_llama(tokenizer)
    for layer in loaded.model.model.layers:
        layer.self_attn.q_proj.weight.data *= 12
        layer.self_attn.k_proj.weight.data *= 12
    return loaded


def reference_probe_scores(model, context, parts):
    """(layers, kv_heads, context) the largest probability any query of `parts`, each read alone
    after the context with eager attention, gives each context key over its query group."""
    keyword, length = cache_keyword(model), len(context)
    kv_heads, best = model.config.num_key_value_heads, None
    for part in parts:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([context]), **{keyword: cache})
        attentions = model(input_ids=torch.tensor([part]), **{keyword: cache}, output_attentions=True).attentions
        probs = torch.stack(attentions)[:, 0, :, :, :length]  # (layers, q_heads, part, length)
        probs = probs.reshape(probs.shape[0], kv_heads, -1, len(part), length).amax((2, 3))
        best = probs if best is None else torch.maximum(best, probs)
    return best


def reference_keep(model, context, parts, heavy, window, pool):
    """Per layer and KV head, the positions a frequency+local head keeps when `parts` are read after
    the context: the last `window`, and the `heavy` best others by `reference_probe_scores`,
    max-pooled (ties: the earlier position)."""
    length = len(context)
    pooled = F.max_pool1d(reference_probe_scores(model, context, parts), pool, stride=1, padding=pool // 2)
    recent = list(range(length - window, length))
    return [[sorted(recent + torch.sort(pooled[layer, head, :length - window], descending=True,
                                        stable=True).indices[:heavy].tolist()) for head in range(pooled.shape[1])]
            for layer in range(pooled.shape[0])]


def test_the_reconstruction_probe_read_in_parts_picks_the_heavy_hitters_as_eager_attention_says(smollm, monkeypatch):
    monkeypatch.setattr(probe_module, "PART_TOKENS", 16)  # the context's copy in four parts
    tokenizer = smollm.tokenizer
    loaded = peaked_llama(tokenizer)
    model = loaded.model
    plan = handmade_plan(model.config, tokenizer, "frequency+local", 160, heavy=5, window=4)
    context = tokenizer(CONTEXT).input_ids
    probe = make_probe(tokenizer, context, "reconstruct")
    parts = probe.parts(256 - len(context))
    assert len(parts) == 3 and all(part[:len(probe.request)] == probe.request for part in parts)
    assert sum(len(part) - len(probe.request) for part in parts) == len(probe.body) == len(context)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = reference_keep(model, context, parts, 5, 4, plan.pool_kernel)
        model.set_attn_implementation("sdpa")
        with kvc.apply(loaded, plan) as applied:
            cache = applied.cache()
            prefill_context(model, cache, context, probe)
    kept = [[positions.tolist() for positions in cache.kept_positions(layer)] for layer in range(2)]
    assert kept == expected
    with torch.no_grad():  # the choice is the probe's: other parts keep other tokens
        model.set_attn_implementation("eager")
        assert reference_keep(model, context, [probe.request + probe.body[-16:]], 5, 4, plan.pool_kernel) != expected
        model.set_attn_implementation("sdpa")


def test_the_probe_is_never_stored_and_the_question_continues_from_the_context(smollm, monkeypatch):
    monkeypatch.setattr(probe_module, "PART_TOKENS", 20)
    tokenizer = smollm.tokenizer
    loaded = tiny_llama(tokenizer)
    model = loaded.model
    context = tokenizer(CONTEXT).input_ids
    question = torch.tensor([tokenizer(" What is the code of the gate?", add_special_tokens=False).input_ids])
    probe = make_probe(tokenizer, context, "reconstruct")
    assert len(probe.parts(256 - len(context))) == 3
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([context]), **{cache_keyword(model): reference})
        expected = model(input_ids=question, **{cache_keyword(model): reference}).logits[0]
    whole = handmade_plan(model.config, tokenizer, "full", 160)
    with kvc.apply(loaded, whole) as applied, torch.no_grad():
        cache = applied.cache()
        prefill_context(model, cache, context, probe)
        assert cache.get_seq_length() == len(context)
        assert cache.kept_positions(0)[0].tolist() == list(range(len(context)))
        logits = model(input_ids=question, **{applied.cache_keyword: cache}).logits[0]
        assert cache.get_seq_length() == len(context) + question.shape[1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_shared_prefill_with_a_probe_leaves_a_window_scored_member_as_its_own_prefill(smollm):
    tokenizer = smollm.tokenizer
    loaded = tiny_llama(tokenizer)
    model = loaded.model
    plan = handmade_plan(model.config, tokenizer, "frequency+local", 160, heavy=8, window=4)
    context = tokenizer(CONTEXT).input_ids
    probe = make_probe(tokenizer, context, "generic")
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        alone = applied.cache()
        model(input_ids=torch.tensor([context]), **{applied.cache_keyword: alone})
        probed, windowed = applied.cache(), applied.cache(probe_scoring=False)
        prefill_context(model, SharedPrefill([probed, windowed]), context, probe)
    for layer in range(plan.num_layers):
        own = [positions.tolist() for positions in alone.kept_positions(layer)]
        assert [positions.tolist() for positions in windowed.kept_positions(layer)] == own
        kept = probed.kept_positions(layer)
        assert all(int(positions.max()) < len(context) for positions in kept)
    assert probed.get_seq_length() == windowed.get_seq_length() == len(context)
    assert any(probed.kept_positions(layer)[head].tolist() != alone.kept_positions(layer)[head].tolist()
               for layer in range(plan.num_layers) for head in range(2))


@pytest.mark.parametrize("probed", [True, False])
def test_a_merging_plan_merges_into_the_window_only_before_the_questions(smollm, probed):
    """Prefilled by a probe (its questions to come) a context merges its evicted tokens into the
    recent window too; prefilled plainly (the question may be in the window) only into heavy hitters.
    Slot by slot against the same plan without merging, which keeps the same tokens."""
    tokenizer = smollm.tokenizer
    loaded = tiny_llama(tokenizer)
    model = loaded.model
    plan = handmade_plan(model.config, tokenizer, "frequency+local", 160, heavy=5, window=4)
    context = tokenizer(CONTEXT).input_ids
    probe = make_probe(tokenizer, context, "generic") if probed else None
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        dropped, merged = applied.cache(), CompressedCache(replace(plan, merge_similarity=-1.0), model)
        prefill_context(model, SharedPrefill([dropped, merged]), context, probe)
    changed = {"heavy": False, "window": False}
    for layer in range(plan.num_layers):
        ours, theirs = dropped.layers[layer].store, merged.layers[layer].store
        assert torch.equal(ours.positions, theirs.positions)
        differs = (ours.values != theirs.values).any(-1)[0]
        in_window = ours.positions[0] >= len(context) - 4
        changed["heavy"] |= bool(differs[(ours.positions[0] >= 0) & ~in_window].any())
        changed["window"] |= bool(differs[in_window].any())
    assert changed == {"heavy": True, "window": probed}


def test_probe_names_are_checked(smollm):
    assert make_probe(smollm.tokenizer, [1, 2, 3], "window") is None
    assert set(PROBES) == {"window", "generic", "reconstruct", "expected", "reconstruct+expected"}
    assert make_probe(smollm.tokenizer, [1, 2, 3], "expected").parts(100) == []  # nothing read after the context
    with pytest.raises(KvcError, match="--context-probe: unknown probe 'recon'"):
        check_probe("recon")


def test_a_context_that_leaves_no_room_for_its_probe_is_refused_before_any_work(smollm):
    tokenizer = smollm.tokenizer
    loaded = tiny_llama(tokenizer)
    plan = handmade_plan(loaded.model.config, tokenizer, "frequency+local", 256, heavy=5, window=4)
    context = (tokenizer(CONTEXT * 8).input_ids * 2)[:240]
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        cache = applied.cache()
        with pytest.raises(KvcError, match="the context \\(240 tokens\\) leaves 16 of the model's positions"):
            prefill_context(loaded.model, cache, context, make_probe(tokenizer, context, "reconstruct"))
        assert not cache.layers[0].store.prefilled and cache.length == 0
        prefill_context(loaded.model, cache, context, make_probe(tokenizer, context, "generic"))  # 14 tokens fit
        assert cache.length == 240


@pytest.mark.parametrize("context, length, start", [(40, 7, 0), (300, 260, 5), (1, 1, 0)])
def test_probe_attention_is_sdpa_and_the_largest_probability_of_each_context_key(context, length, start):
    """One softmax gives both: the output SDPA gives the probe (context from `start`, itself causally)
    and each context key's largest probability (the reference scorer with reduce='max', unpooled)."""
    generator = torch.Generator().manual_seed(context + length)
    query = torch.randn(1, 6, length, 16, generator=generator) * 2
    keys, values = (torch.randn(1, 2, context + length, 16, generator=generator) for _ in range(2))
    output, scores = probe_module.probe_attention(query, keys, values, torch.tensor([start]), 0.25)
    visible = torch.ones(length, context + length, dtype=torch.bool).tril(context)
    visible[:, :start] = False
    expected = F.scaled_dot_product_attention(query, keys.repeat_interleave(3, 1), values.repeat_interleave(3, 1),
                                              attn_mask=visible, scale=0.25)
    torch.testing.assert_close(output, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    reference = observation_scores_reference(query, keys, torch.tensor([start]), 0.25, 1, "max")[..., :context]
    torch.testing.assert_close(scores, reference, atol=1e-6, rtol=1e-5)
