"""Probes after a context (`kvc.runtime.probe`): the probe's queries pick the frequency heads' tokens
as a hand-written SnapKV score says, the probe itself never enters the cache, a question's positions
continue from the context's end, and a member of a shared prefill that does not score by probes ends
as a prefill of the context alone would leave it."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvc
from kvc.policies.errors import KvcError
from kvc.runtime.apply import cache_keyword
from kvc.runtime.handmade import handmade_plan
from kvc.runtime.probe import PROBES, check_probe, prefill_context, probe_ids
from kvc.runtime.shared_prefill import SharedPrefill
from kvc.runtime.store import LayerStore
from tests.runtime.test_step import tiny_llama

CONTEXT = ("The lighthouse keeper counted ships, storms and gulls. Her brother, a baker in the town, sent bread "
           "every Tuesday; the code of the gate was 4417. Nobody else climbed the stairs, except the cat.")


def reference_keep(query, keys, probe_keys, heavy, window, pool):
    """Per KV head, the positions a frequency+local head keeps: the last `window`, and the `heavy` best
    others by the probe queries' softmax (over context and, causally, probe keys), its largest value
    over the group and the probe, max-pooled (ties: the earlier position)."""
    length, probe = keys.shape[2], probe_keys.shape[2]
    kv_heads = keys.shape[1]
    every = torch.cat([keys, probe_keys], 2)[0]  # (kv_heads, length + probe, dim)
    grouped = query[0].reshape(kv_heads, -1, probe, query.shape[-1])
    logits = torch.einsum("hgpd,hnd->hgpn", grouped, every) * query.shape[-1] ** -0.5
    visible = torch.arange(length + probe)[None, :] <= length + torch.arange(probe)[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).amax((1, 2))[:, :length]
    pooled = F.max_pool1d(probs[:, None], pool, stride=1, padding=pool // 2)[:, 0]
    kept = []
    for head in range(kv_heads):
        recent = list(range(length - window, length))
        best = [int(i) for i in torch.sort(pooled[head, :length - window], descending=True, stable=True).indices[:heavy]]
        kept.append(sorted(recent + best))
    return kept


def test_probe_queries_pick_the_heavy_hitters_as_the_reference_does(smollm):
    loaded = tiny_llama(smollm.tokenizer)
    plan = handmade_plan(loaded.model.config, smollm.tokenizer, "frequency+local", 64, heavy=5, window=4)
    generator = torch.Generator().manual_seed(7)
    length, probe = 40, 6
    keys, values = (torch.randn(1, 2, length, 16, generator=generator) for _ in range(2))
    probe_keys = torch.randn(1, 2, probe, 16, generator=generator)
    query = torch.randn(1, 4, probe, 16, generator=generator) * 3
    classes, start = torch.zeros(1, length, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)
    probed = LayerStore(plan, 0, kernels="reference")
    probed.prefill(keys, values, classes, start, query, 16 ** -0.5, probe_keys=probe_keys)
    expected = reference_keep(query, keys, probe_keys, 5, 4, plan.pool_kernel)
    assert [positions.tolist() for positions in probed.kept_positions()] == expected
    other = torch.randn(1, 4, probe, 16, generator=generator) * 3  # the choice depends on the probe's queries
    assert reference_keep(other, keys, probe_keys, 5, 4, plan.pool_kernel) != expected


def test_the_probe_is_never_stored_and_the_question_continues_from_the_context(smollm):
    tokenizer = smollm.tokenizer
    loaded = tiny_llama(tokenizer)
    model = loaded.model
    context = tokenizer(CONTEXT).input_ids
    question = torch.tensor([tokenizer(" What is the code of the gate?", add_special_tokens=False).input_ids])
    probe = probe_ids(tokenizer, context, "reconstruct")
    assert len(probe) > len(context)
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
    probe = probe_ids(tokenizer, context, "generic")
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


def test_probe_names_are_checked(smollm):
    assert probe_ids(smollm.tokenizer, [1, 2, 3], "window") == []
    assert set(PROBES) == {"window", "generic", "reconstruct"}
    with pytest.raises(KvcError, match="--context-probe: unknown probe 'recon'"):
        check_probe("recon")
