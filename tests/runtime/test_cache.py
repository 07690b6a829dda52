"""CompressedCache inside transformers on the embedded model: a keep-everything plan reproduces
DynamicCache (tokens and fp32 logits), batches with left padding work, memory is the plan's, and
plans that do not fit the model, the batch or the length are refused."""

import pytest
import torch
from transformers import DynamicCache

import kvc
from kvc.policies.errors import KvcError
from kvc.runtime.apply import cache_keyword
from kvc.runtime.cache import CompressedCache
from kvc.runtime.handmade import handmade_plan

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens, and wrote the weather in a leather logbook: wind from the west, "
    "rain by midnight, ships sighted near the northern reef. In winter the storms were fierce; "
    "waves broke over the rocks and salt crusted the windows. Still, the light never failed. "
    "Sailors along the coast told stories about him, and children in the village waved when "
    "he walked to the market on Saturdays. One morning a letter arrived from the capital."
)


def greedy(model, input_ids, cache, attention_mask=None, new_tokens=8):
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, **{cache_keyword(model): cache}, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def largest_logit_difference(first, second):
    return max(float((a - b).abs().max()) for a, b in zip(first.logits, second.logits))


@pytest.fixture(scope="module")
def full_plan(smollm):
    return handmade_plan(smollm.model.config, smollm.tokenizer, "full", 256, batch=2)


def test_full_plan_reproduces_dynamic_cache(smollm, full_plan):
    model, tokenizer = smollm.model, smollm.tokenizer
    input_ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    reference = greedy(model, input_ids, DynamicCache(config=model.config))
    with kvc.apply(smollm, full_plan) as applied:
        cache = applied.cache()
        compressed = greedy(model, input_ids, cache)
    assert torch.equal(compressed.sequences, reference.sequences)
    assert largest_logit_difference(compressed, reference) < 1e-4
    assert cache.nbytes() == full_plan.cache_bytes_at(1)  # one sequence of a batch-2 plan
    assert [len(p) for p in cache.kept_positions(0)] == [input_ids.shape[1] + 7] * 3


def test_left_padded_batch_matches_dynamic_cache(smollm, full_plan):
    model, tokenizer = smollm.model, smollm.tokenizer
    first = tokenizer(PASSAGE, return_tensors="pt").input_ids[0]
    second = first[40:]
    input_ids = torch.stack([first, torch.cat([torch.zeros(40, dtype=torch.long), second])])
    attention_mask = (torch.arange(len(first)) >= torch.tensor([[0], [40]])).long()
    reference = greedy(model, input_ids, DynamicCache(config=model.config), attention_mask)
    with kvc.apply(smollm, full_plan) as applied:
        cache = applied.cache()
        compressed = greedy(model, input_ids, cache, attention_mask)
        alone = greedy(model, second[None], applied.cache())
    assert torch.equal(compressed.sequences, reference.sequences)
    assert largest_logit_difference(compressed, reference) < 1e-4
    assert torch.equal(compressed.sequences[1, len(first):], alone.sequences[0, len(second):])
    assert cache.nbytes() == full_plan.cache_bytes
    assert [len(p) for p in cache.kept_positions(3, sequence=1)] == [len(second) + 7] * 3


def test_compressed_bytes_equal_the_plan(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    kinds = [["special+punct", "special+punct+frequency+local", "local"]] * 30
    plan = handmade_plan(model.config, tokenizer, kinds, 256, class_slots=24, heavy=16, window=16)
    input_ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    with kvc.apply(smollm, plan) as applied:
        cache = applied.cache()
        greedy(model, input_ids, cache, new_tokens=4)
    assert cache.nbytes() == plan.cache_bytes
    assert plan.score_bytes > 0 and plan.cache_bytes < plan.full_cache_bytes / 4
    capacity = plan.capacity[7].tolist()
    assert all(len(kept) <= slots for kept, slots in zip(cache.kept_positions(7), capacity))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_the_cache_is_taken_by_either_keyword(smollm, full_plan):
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name still works there, with a warning)."""
    model, tokenizer = smollm.model, smollm.tokenizer
    input_ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    keywords = {cache_keyword(model), "past_key_values"}
    logits = []
    with kvc.apply(smollm, full_plan) as applied, torch.no_grad():
        for keyword in keywords:
            cache = applied.cache()
            logits.append(model(input_ids, **{keyword: cache}).logits)
            assert cache.get_seq_length() == input_ids.shape[1]
    assert all(torch.equal(logits[0], other) for other in logits)


def test_low_bit_rows_on_the_embedded_model(smollm):
    """A keep-everything plan with 8-bit rows predicts as the full-precision model does, 4-bit rows stay
    close (teacher-forced: the continuation goes in as one chunk after the prompt, so one near-tie
    cannot make the sequences part); both take exactly their plan's bytes."""
    model, tokenizer = smollm.model, smollm.tokenizer
    input_ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    continuation = greedy(model, input_ids, DynamicCache(config=model.config)).sequences[:, input_ids.shape[1]:]
    keyword = cache_keyword(model)
    with torch.no_grad():
        full = model(torch.cat([input_ids, continuation], 1)).logits[:, input_ids.shape[1]:]
    differences = {}
    for bits in (8, 4):
        plan = handmade_plan(model.config, tokenizer, "full", 256, kv_bits=bits)
        with kvc.apply(smollm, plan) as applied, torch.no_grad():
            cache = applied.cache()
            model(input_ids, **{keyword: cache})
            logits = model(continuation, **{keyword: cache}).logits
        assert cache.nbytes() == plan.cache_bytes < plan.full_cache_bytes * (bits + 2) / 32
        differences[bits] = float((logits - full).abs().max())
        if bits == 8:
            assert torch.equal(logits.argmax(-1), full.argmax(-1))
    assert 0 < differences[8] < differences[4] < 2.0, differences


def test_a_plan_for_another_model_is_refused(smollm, full_plan):
    other = handmade_plan(smollm.model.config, smollm.tokenizer, "full", 256)
    other.fingerprint = "sha256:0000000000000000"
    with pytest.raises(KvcError, match="compiled for"):
        kvc.apply(smollm, other)
    with pytest.raises(KvcError, match="kvc.apply"):
        CompressedCache(full_plan, smollm.model)
    with kvc.apply(smollm, full_plan), pytest.raises(KvcError, match="compiled for"):
        CompressedCache(other, smollm.model)


def test_batch_and_length_beyond_the_plan_are_refused(smollm):
    model, tokenizer = smollm.model, smollm.tokenizer
    plan = handmade_plan(model.config, tokenizer, "full", 32)
    input_ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    with kvc.apply(smollm, plan) as applied:
        with pytest.raises(KvcError, match="recompile with `kvc compile POLICY --max-len"):
            greedy(model, input_ids, applied.cache())
        with pytest.raises(KvcError, match="--batch 2` or more"):
            greedy(model, input_ids[:, :8].repeat(2, 1), applied.cache())


def test_apply_changes_nothing_until_called_and_restore_undoes_it(smollm, full_plan):
    model, tokenizer = smollm.model, smollm.tokenizer
    input_ids = tokenizer(PASSAGE, return_tensors="pt").input_ids[:, :32]
    before = model.config._attn_implementation
    with torch.no_grad():
        expected = model(input_ids).logits
        kvc.apply(smollm, full_plan)
        assert model.config._attn_implementation == "kvc"
        plain = model(input_ids, **{cache_keyword(model): DynamicCache(config=model.config)}).logits  # other caches: SDPA
        kvc.restore(smollm)
    assert model.config._attn_implementation == before
    assert torch.allclose(plain, expected, atol=1e-5)
    assert not model.base_model._forward_pre_hooks
