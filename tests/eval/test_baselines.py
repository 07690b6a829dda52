"""Every baseline's plan on the embedded model's shape: kinds, bytes within the budget, the published keep-sets."""

from itertools import pairwise

import numpy as np
import pytest

from kvc.compiler.compile import DEFAULT_KV_BITS, MERGE_SIMILARITY
from kvc.eval.baselines import METHODS, adakv_split, full_bytes, method_plan
from kvc.policies.errors import KvcError
from kvc.policies.kinds import kind_code
from kvc.policies.schema import Curve
from kvc.policies.synthetic import synthetic_policy

MAX_LEN = 1040
BUDGET = 0.25
KINDS = {
    "full": {"full"},
    "streamingllm": {"special+local"},
    "h2o": {"frequency+local"},
    "snapkv": {"frequency+local"},
    "pyramidkv": {"frequency+local"},
    "adakv": {"frequency+local"},
}


@pytest.fixture(scope="module")
def shaped_policy():
    """A synthetic policy with SmolLM2-135M's shape (30 layers, 9 query and 3 KV heads of 64)."""
    return synthetic_policy(30, 9, 3, 64, seed=3, max_position_embeddings=8192, vocab_size=49152)


def plan_for(method, smollm, policy, max_len=MAX_LEN, fraction=BUDGET):
    return method_plan(method, smollm, policy, max_len, fraction)


def kinds_of(plan) -> set[int]:
    return set(plan.kind_codes.flatten().tolist())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_plan_fits_its_budget_and_is_deterministic(smollm, shaped_policy, method):
    plan = plan_for(method, smollm, shaped_policy)
    budget = int(BUDGET * full_bytes(smollm, MAX_LEN, "float32"))
    assert (plan.cache_bytes <= budget) != (method == "full")
    every_token_kept = int(plan.capacity.min()) == MAX_LEN  # 4-bit rows hold all 1,040 tokens in 69%
    assert plan.cache_bytes > 0.9 * budget or every_token_kept or method in {"full", "kvc-fastgen"}
    assert int(plan.capacity.max()) <= MAX_LEN
    assert plan.target.max_len == MAX_LEN and plan.target.dtype == "float32"
    if method in KINDS:
        assert kinds_of(plan) == {kind_code(kind) for kind in KINDS[method]}
    again = plan_for(method, smollm, shaped_policy)
    assert all(bool((getattr(plan, name) == getattr(again, name)).all())
               for name in ("kind_codes", "sinks", "class_slots", "heavy", "window", "full_slots"))


def test_kvc_stores_low_bit_rows_and_the_baselines_the_cache_dtype(smollm, shaped_policy):
    plans = {method: plan_for(method, smollm, shaped_policy) for method in METHODS}
    kvc_strategies = {"kvc", "kvc-drop", "kvc-merge", "kvc-knapsack", "kvc-fastgen"}
    expected = {m: DEFAULT_KV_BITS * (m in kvc_strategies) for m in METHODS} | {"kvc-4bit": 4}
    assert {m: p.kv_bits for m, p in plans.items()} == expected
    merging = {m: None for m in METHODS} | {"kvc-merge": MERGE_SIMILARITY}  # at 25% only kvc-merge merges
    assert {m: p.merge_similarity for m, p in plans.items()} == merging
    tight = {m: plan_for(m, smollm, shaped_policy, fraction=0.1) for m in ("kvc", "kvc-drop", "kvc-merge", "snapkv")}
    assert {m: p.merge_similarity for m, p in tight.items()} == {"kvc": MERGE_SIMILARITY, "kvc-drop": None,
                                                                 "kvc-merge": MERGE_SIMILARITY, "snapkv": None}
    assert int(plans["kvc"].capacity.sum()) > 2 * int(plans["kvc-plain"].capacity.sum())  # the same bytes
    long = {m: plan_for(m, smollm, shaped_policy, 8192, 0.1) for m in ("kvc", "kvc-4bit")}  # no head holds it all
    assert int(long["kvc-4bit"].capacity.sum()) > 1.5 * int(long["kvc"].capacity.sum())


def test_streamingllm_keeps_four_sinks_and_a_recent_window(smollm):
    plan = plan_for("streamingllm", smollm, None)
    assert set(plan.sinks.flatten().tolist()) == {4}
    assert int(plan.class_slots.sum()) == 0 and int(plan.heavy.sum()) == 0
    window = set(plan.window.flatten().tolist())
    assert len(window) == 1 and window.pop() > 200  # a quarter of 1040 slots, less the sinks


def test_h2o_scores_over_every_prompt_query_half_heavy_half_recent(smollm):
    plan = plan_for("h2o", smollm, None)
    assert plan.observation_window >= MAX_LEN and plan.pool_kernel == 1
    assert int(plan.sinks.sum()) == 0
    assert int((plan.window - plan.heavy).abs().max()) <= 1


def test_snapkv_and_pyramidkv_windows_and_funnel(smollm, shaped_policy):
    snapkv = plan_for("snapkv", smollm, shaped_policy)
    assert set(snapkv.window.flatten().tolist()) == {32}
    assert snapkv.observation_window == 32 and snapkv.pool_kernel == 7
    assert int(snapkv.capacity.max() - snapkv.capacity.min()) <= 1
    pyramid = plan_for("pyramidkv", smollm, shaped_policy)
    layers = pyramid.capacity.sum(dim=1).tolist()
    assert set(pyramid.window.flatten().tolist()) == {8}
    assert layers[0] > 10 * layers[-1] and all(a >= b for a, b in pairwise(layers))


def test_adakv_split_follows_the_published_rule():
    """Head A has 90% of its attention on 5 of 100 tokens, head B spreads it evenly. Of the layer's
    top-20 scores A holds 5 and B 15; with alpha 0.2 and B = 10: 0.8*5 + 2 = 6 and 0.8*15 + 2 = 14."""
    concentrated, spread = Curve([0.05, 1.0], [0.9, 1.0]), Curve([1.0], [1.0])
    assert adakv_split([concentrated, spread], 20, 100).tolist() == [6, 14]
    assert adakv_split([spread, spread], 20, 100).tolist() == [10, 10]
    slots = adakv_split([concentrated, spread, spread], 31, 100, alpha=0.2)
    assert slots.sum() == 31 and slots.min() >= np.floor(0.2 * 31 / 3)


def test_adakv_gives_every_layer_the_same_budget(smollm, shaped_policy):
    plan = plan_for("adakv", smollm, shaped_policy)
    layers = plan.capacity.sum(dim=1)
    assert int(layers.max() - layers.min()) == 0
    assert int((plan.capacity.max(dim=1).values - plan.capacity.min(dim=1).values).max()) > 0


@pytest.mark.parametrize("method", [m for m, baseline in METHODS.items() if baseline.needs_policy])
def test_methods_that_need_a_policy_say_so(smollm, method):
    with pytest.raises(KvcError, match="needs a policy"):
        plan_for(method, smollm, None)
