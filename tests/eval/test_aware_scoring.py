"""benchmarks/aware_scoring.py, the measurement of other scores with the question in the prompt: a marked
plan keeps the top of the window's and expected attention's shares summed, of expected attention
alone, or of every prompt query's attention summed (H2O's score); an unmarked plan keeps what kvc keeps."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kvc
from kvc.eval import baselines
from kvc.policies.synthetic import synthetic_policy
from kvc.runtime import cache
from kvc.runtime.apply import cache_keyword
from kvc.runtime.expected_attention import expected_attention
from kvc.runtime.handmade import handmade_plan
from tests.runtime.test_probe import CONTEXT, peaked_llama

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "aware_scoring.py"
HEAVY, WINDOW = 5, 4


@pytest.fixture
def script(monkeypatch):
    """The script, not yet installed; whatever `install()` replaces is restored after the test."""
    spec = importlib.util.spec_from_file_location("aware_scoring", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(baselines, "METHODS", dict(baselines.METHODS))
    monkeypatch.setattr(cache.CompressedCache, "__init__", cache.CompressedCache.__init__)
    monkeypatch.setattr(cache.CompressedLayer, "compress", cache.CompressedLayer.compress)
    return module


@pytest.fixture
def scoring(script):
    script.install()
    return script


def kept_after_prompt(loaded, plan, prompt):
    """Each layer's kept positions per head after the prompt's prefill."""
    with torch.no_grad(), kvc.apply(loaded, plan) as applied:
        compressed = applied.cache()
        loaded.model(input_ids=torch.tensor([prompt]), **{cache_keyword(loaded.model): compressed})
    return [[kept.tolist() for kept in compressed.kept_positions(layer)] for layer in range(plan.num_layers)]


def window_shares(query, keys, scale, observation_window):
    """(kv_heads, length) each key's summed attention from the prompt's last queries, a share of its head's total."""
    length, group = keys.shape[2], query.shape[1] // keys.shape[1]
    logits = (query[0].float() @ keys[0].float().repeat_interleave(group, 0).transpose(-1, -2)) * scale
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)[:, -observation_window:]
    summed = probs.sum(1).unflatten(0, (keys.shape[1], group)).sum(1)
    return summed / summed.sum(-1, keepdim=True)


@pytest.mark.parametrize("method", ["kvc-we", "kvc-e", "kvc-acc"])
def test_a_marked_plan_keeps_the_top_of_its_scores(smollm, monkeypatch, scoring, method):
    tokenizer = smollm.tokenizer
    loaded = peaked_llama(tokenizer)
    model = loaded.model
    plan = handmade_plan(model.config, tokenizer, "frequency+local", 160, heavy=HEAVY, window=WINDOW)
    plan.notes[scoring.NOTE] = scoring.SCORINGS[method]
    prompt = tokenizer(CONTEXT).input_ids
    seen = []  # each layer's prompt queries, keys, values and scale, as the script scored them

    def recorded(layer, query, keys, values, scale, marked):
        seen.append((query, keys, values, scale))
        return scored(layer, query, keys, values, scale, marked)

    scored = scoring.prompt_scores
    monkeypatch.setattr(scoring, "prompt_scores", recorded)
    kept_positions = kept_after_prompt(loaded, plan, prompt)
    assert len(seen) == 2
    length = len(prompt)
    frequencies = model.model.rotary_emb.inv_freq.float()
    for layer, (query, keys, values, scale) in enumerate(seen):
        expected = expected_attention(query, keys, values, torch.tensor([0]), scale, frequencies)[0]
        scores = expected / expected.sum(-1, keepdim=True)
        if method == "kvc-we":
            scores = scores + window_shares(query, keys, scale, plan.observation_window)
        if method == "kvc-acc":
            scores = window_shares(query, keys, scale, length)
        pooled = F.max_pool1d(scores[None], plan.pool_kernel, stride=1, padding=plan.pool_kernel // 2)[0]
        for head in range(2):
            order = torch.sort(pooled[head, :length - WINDOW], descending=True, stable=True).indices
            kept = sorted(list(range(length - WINDOW, length)) + order[:HEAVY].tolist())
            assert kept_positions[layer][head] == kept


def test_an_unmarked_plan_keeps_what_it_kept_before_the_script_was_installed(smollm, monkeypatch, script):
    tokenizer = smollm.tokenizer
    loaded = peaked_llama(tokenizer)
    plan = handmade_plan(loaded.model.config, tokenizer, "frequency+local", 160, heavy=HEAVY, window=WINDOW)
    prompt = tokenizer(CONTEXT).input_ids
    before = kept_after_prompt(loaded, plan, prompt)
    script.install()
    scored = script.prompt_scores
    monkeypatch.setattr(script, "prompt_scores", lambda *args: pytest.fail("an unmarked plan scored by the script"))
    assert kept_after_prompt(loaded, plan, prompt) == before
    plan.notes[script.NOTE] = "expected"
    monkeypatch.setattr(script, "prompt_scores", scored)
    assert kept_after_prompt(loaded, plan, prompt) != before  # expected attention picks otherwise here


def test_the_methods_are_kvc_s_plan_marked(scoring):
    policy = synthetic_policy(24, 16, 4, 64, seed=2, max_position_embeddings=32768, vocab_size=5000)
    for method, marked in scoring.SCORINGS.items():
        plan = baselines.METHODS[method].build(None, policy, 2048, 0.1, "bfloat16")
        default = baselines.METHODS["kvc"].build(None, policy, 2048, 0.1, "bfloat16")
        assert plan.notes[scoring.NOTE] == marked and scoring.NOTE not in default.notes
        assert torch.equal(plan.capacity, default.capacity) and plan.strategy == default.strategy
