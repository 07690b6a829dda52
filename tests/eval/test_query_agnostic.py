"""The question asked after compression: one shared prefill for every method, then each method's own
extend and decode, end to end through the harness on a short setting."""

from dataclasses import replace

import pytest
import torch

from kvc.eval import paired
from kvc.eval.baselines import method_plan
from kvc.eval.harness import evaluate
from kvc.eval.passkey import passkey_sample
from kvc.eval.questions import QUERY_AGNOSTIC, QUERY_AWARE, Prompt, answer_all
from kvc.eval.settings import Settings, check_lengths, question_settings
from kvc.policies.errors import KvcError
from kvc.policies.synthetic import synthetic_policy
from kvc.runtime.apply import apply
from kvc.runtime.cache import CompressedCache
from kvc.runtime.probe import DEFAULT_PROBE, make_probe, prefill_context
from kvc.runtime.shared_prefill import SharedPrefill

LENGTH = 360


@pytest.fixture(scope="module")
def policy_of_model(smollm):
    """A synthetic policy of the embedded model's shape and fingerprint: kvc's plan, without a profile."""
    policy = synthetic_policy(30, 9, 3, 64, seed=3, max_position_embeddings=8192, vocab_size=49152)
    return replace(policy, model=replace(policy.model, fingerprint=smollm.fingerprint))


@pytest.fixture(scope="module")
def prompt(smollm):
    sample = passkey_sample(smollm.tokenizer, LENGTH, 0.5, seed=3)
    return Prompt.encode(smollm.tokenizer, sample.context, sample.question), sample.passkey


@pytest.fixture(scope="module")
def plans(smollm, policy_of_model):
    max_len = LENGTH + 20
    return [method_plan(method, smollm, policy_of_model, max_len, 1.0 if method == "full" else 0.25, "bfloat16")
            for method in ("full", "h2o", "kvc")]


def cache_state(cache):
    return [(store.positions.clone(), store.scores.clone(), store.counts.clone(), store.rows)
            for store in (layer.store for layer in cache.layers)]


def test_one_shared_prefill_leaves_each_cache_as_its_own_prefill_would(smollm, prompt, plans):
    ids = torch.tensor([prompt[0].context_ids])
    with torch.no_grad(), apply(smollm, plans[0]):
        alone = []
        for plan in plans:
            cache = CompressedCache(plan, smollm.model)
            smollm.model(input_ids=ids, cache=cache, logits_to_keep=1)
            alone.append(cache)
        shared = [CompressedCache(plan, smollm.model) for plan in plans]
        smollm.model(input_ids=ids, cache=SharedPrefill(shared), logits_to_keep=1)
    for one, other in zip(alone, shared):
        assert other.length == one.length == ids.shape[1]
        for (positions, scores, counts, rows), (positions2, scores2, counts2, rows2) in zip(
                cache_state(one), cache_state(other)):
            assert torch.equal(positions, positions2) and torch.equal(counts, counts2)
            assert torch.allclose(scores, scores2, atol=1e-6)
            for row, row2 in zip(rows if isinstance(rows, tuple) else [rows], rows2 if isinstance(rows2, tuple) else [rows2]):
                assert torch.equal(row, row2)


def test_the_full_cache_answers_alike_in_both_settings_and_a_method_keeps_other_tokens(smollm, prompt, plans):
    text, passkey = prompt
    aware = answer_all(smollm, plans, text, QUERY_AWARE, 8)
    agnostic = answer_all(smollm, plans, text, QUERY_AGNOSTIC, 8)
    assert aware[0].tokens == agnostic[0].tokens  # nothing dropped: where the question comes changes nothing
    assert passkey in smollm.tokenizer.decode(aware[0].tokens).replace(" ", "")
    assert [a.cache_bytes for a in aware] == [a.cache_bytes for a in agnostic]


def test_a_probe_scores_kvc_only_and_the_baselines_answer_as_without_it(smollm, prompt, plans):
    """Query-agnostic with the evaluation's probe (reconstruction and expected attention): the full
    cache and H2O (not probed) answer as with no probe; kvc's SnapKV-style heads keep other tokens
    than the context's last queries pick."""
    text, _ = prompt
    window = answer_all(smollm, plans, text, QUERY_AGNOSTIC, 8)
    probed = answer_all(smollm, plans, text, QUERY_AGNOSTIC, 8, probe=DEFAULT_PROBE, probed=[False, False, True])
    assert [a.tokens for a in probed[:2]] == [a.tokens for a in window[:2]]
    kept = []
    for probe in ("window", DEFAULT_PROBE):
        with torch.no_grad(), apply(smollm, plans[2]):
            cache = CompressedCache(plans[2], smollm.model)
            prefill_context(smollm.model, cache, text.context_ids, make_probe(smollm.tokenizer, text.context_ids, probe))
            kept.append([positions for layer in range(30) for positions in cache.kept_positions(layer)])
            assert cache.length == len(text.context_ids)
    assert any(not torch.equal(a, b) for a, b in zip(*kept))


def test_query_agnostic_scores_do_not_see_the_question(smollm, prompt, plans):
    """H2O's heavy hitters after the context alone are the same whatever question follows."""
    context, _ = prompt
    other = Prompt(context.context_ids, smollm.tokenizer(" Repeat the first sentence.", add_special_tokens=False).input_ids)
    kept = []
    for text in (context, other):
        with torch.no_grad(), apply(smollm, plans[1]):
            cache = CompressedCache(plans[1], smollm.model)
            smollm.model(input_ids=torch.tensor([text.context_ids]), cache=cache, logits_to_keep=1)
            before = cache.kept_positions(15)
            smollm.model(input_ids=torch.tensor([text.question_ids]), cache=cache, logits_to_keep=1)
        kept.append(before)
    assert all(torch.equal(a, b) for a, b in zip(*kept))


def test_the_harness_asks_in_both_settings_for_a_baseline_and_kvc(smollm, policy_of_model):
    settings = Settings(tasks=["passkey"], methods=["full", "streamingllm", "kvc"], budgets=[0.25],
                        lengths=[LENGTH], depths=[0.5], samples=1, first_sample=3, answer_tokens=8)
    results = evaluate(smollm, settings, policy_of_model, show_progress=False)
    records = results.records
    cells = [(r.task, r.setting, r.method) for r in records]
    assert cells == [("passkey", setting, method) for setting in (QUERY_AWARE, QUERY_AGNOSTIC)
                     for method in ("full", "streamingllm", "kvc")]
    for record in records:  # the full cache is the reference (its plan adds its tables to the full bytes)
        assert record.method == "full" or record.cache_bytes <= 0.25 * record.full_bytes
    assert [r.score for r in records if r.method == "full"] == [1.0, 1.0]
    # the recent window holds the passkey's question only when it was in the prompt
    streaming = {r.setting: r.completion for r in records if r.method == "streamingllm"}
    assert streaming[QUERY_AWARE] != streaming[QUERY_AGNOSTIC]
    # kvc is held against the baseline in each setting, on the one prompt both answered: too few for an interval
    found = paired.comparisons(results)
    assert [(c.setting, c.baseline, c.prompts, c.verdict) for c in found] == [
        (setting, "streamingllm", 1, "fewer than 10 prompts") for setting in (QUERY_AGNOSTIC, QUERY_AWARE)]
    scores = {(r.setting, r.method): r.score for r in records}
    assert [c.difference for c in found] == [scores[(c.setting, "kvc")] - scores[(c.setting, "streamingllm")]
                                             for c in found]


def test_fidelity_needs_the_full_cache_and_setting_names_are_checked(smollm):
    settings = Settings(tasks=["fidelity"], methods=["streamingllm"], budgets=[0.25], lengths=[200], depths=[0.5])
    with pytest.raises(KvcError, match="add full to --methods"):
        evaluate(smollm, settings, show_progress=False)
    assert question_settings("both") == [QUERY_AWARE, QUERY_AGNOSTIC]
    assert question_settings("query-agnostic") == [QUERY_AGNOSTIC]
    with pytest.raises(KvcError, match="--setting: unknown value 'agnostic'"):
        question_settings("agnostic")


def test_lengths_the_reconstruction_probe_cannot_reread_are_refused():
    settings = Settings(tasks=["passkey"], methods=["kvc", "snapkv"], budgets=[0.25], lengths=[1024, 8150],
                        depths=[0.5])
    check_lengths(replace(settings, lengths=[1024, 7680]), 8192)  # parts of 64 tokens or more still fit after 7,680
    for rereading in (settings, replace(settings, context_probe="reconstruct")):  # the default rereads too
        with pytest.raises(KvcError, match="rereads a context of 8150 tokens in parts after it, at least 64 tokens"):
            check_lengths(rereading, 8192)
    check_lengths(settings, 8192, asks=False)  # perplexity alone: no question, no probe
    for other in (replace(settings, context_probe="generic"), replace(settings, context_probe="expected"),
                  replace(settings, setting=[QUERY_AWARE]), replace(settings, methods=["snapkv"])):
        check_lengths(other, 8192)
