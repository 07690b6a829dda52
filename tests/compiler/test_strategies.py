"""Every strategy meets its target (or says why not) with plans the runtime can hold."""

import copy

import numpy as np
import pytest
import torch

from kvc.compiler import STRATEGIES, compile_policy
from kvc.compiler.compile import deployment_for
from kvc.compiler.retrieval import RETRIEVAL_SHARE, RETRIEVAL_THRESHOLD
from kvc.compiler.schedules import (
    PYRAMID_ALPHA,
    PYRAMID_BETA,
    allocate_slots,
    pyramid_weights,
)
from kvc.compiler.strategies import fastgen_choice, fastgen_table, kv_heads
from kvc.plan import DTYPE_BYTES, POSITION_BYTES
from kvc.policies.errors import KvcError
from kvc.policies.kinds import FASTGEN_POLICIES, KIND_BITS, kind_code


def compile_plain(*args, **kwargs):
    """The strategies on rows in the cache dtype, which the slot arithmetic below counts."""
    return compile_policy(*args, kv_bits=0, **kwargs)

TARGETS = [0.03, 0.1, 0.25, 0.6]


def assert_runtime_invariants(plan):
    """Component slots only where the kind has the component; full heads hold max_len and nothing else."""
    full = plan.has("full")
    assert torch.equal(plan.full_slots, torch.where(full, plan.target.max_len, 0))
    for table, component in ((plan.heavy, "frequency"), (plan.window, "local")):
        assert not (table[~plan.has(component)] != 0).any()
    assert not (plan.sinks[~plan.has("special")] != 0).any()
    assert not (plan.class_slots[~(plan.has("special") | plan.has("punct"))] != 0).any()
    assert not (full & (plan.kind_codes != KIND_BITS["full"])).any()
    for name in ("sinks", "class_slots", "heavy", "window", "full_slots"):
        assert (getattr(plan, name) >= 0).all() and getattr(plan, name).dtype == torch.int32
    assert (plan.capacity >= 1).all() and (plan.capacity <= plan.target.max_len).all()
    assert ((plan.expected_recovery >= 0) & (plan.expected_recovery <= 1)).all()
    assert int(plan.head_bytes().sum()) + plan.overhead_bytes == plan.cache_bytes


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("target", TARGETS)
def test_every_strategy_meets_its_target(wide_policy, strategy, target):
    plan = compile_plain(wide_policy, target, max_len=8192, strategy=strategy)
    assert plan.strategy == strategy and plan.target.fraction == target
    assert plan.target.budget_bytes == int(target * plan.full_cache_bytes)
    assert plan.cache_bytes <= plan.target.budget_bytes
    assert_runtime_invariants(plan)
    used = plan.cache_bytes / plan.target.budget_bytes
    if strategy == "fastgen":  # steps: the next threshold would not have fitted
        assert plan.notes["fastgen"]["next_bytes"] > plan.target.budget_bytes
    elif strategy == "knapsack" and plan.notes["knapsack"]["saturated"]:
        assert (plan.expected_recovery > 0.999).float().mean() > 0.5
    else:
        assert used > 0.999


def test_knapsack_recovers_more_with_more_memory_and_beats_the_fixed_schedules(wide_policy):
    recovery = {}
    for strategy in STRATEGIES:
        recovery[strategy] = [float(compile_plain(wide_policy, t, max_len=8192, strategy=strategy).expected_recovery.mean())
                              for t in TARGETS]
    assert recovery["knapsack"] == sorted(recovery["knapsack"])
    for other in ("fastgen", "pyramid", "uniform"):
        assert all(k >= o - 1e-6 for k, o in zip(recovery["knapsack"], recovery[other]))


def test_knapsack_reports_its_bound(wide_policy):
    plan = compile_plain(wide_policy, 0.1, max_len=8192, strategy="knapsack")
    bound = plan.notes["knapsack"]["recovery_bound"]
    assert float(plan.expected_recovery.mean()) <= bound + 1e-6
    assert float(plan.expected_recovery.mean()) >= bound - 1e-3


def test_fastgen_rule_at_the_profiled_threshold_reproduces_the_policy_kinds(small_policy):
    deployment = deployment_for(small_policy, 4096, 1, "bfloat16")
    _, _, recoveries = fastgen_table(small_policy, deployment)
    choice = fastgen_choice(recoveries, small_policy.profile.threshold)
    assert [FASTGEN_POLICIES[i] for i in choice] == [h.kind for h in kv_heads(small_policy)]


def test_fastgen_takes_the_highest_threshold_that_fits(small_policy):
    loose = compile_plain(small_policy, 0.6, max_len=4096, strategy="fastgen")
    tight = compile_plain(small_policy, 0.1, max_len=4096, strategy="fastgen")
    assert tight.notes["fastgen"]["threshold"] < loose.notes["fastgen"]["threshold"]
    assert tight.cache_bytes <= tight.target.budget_bytes < tight.notes["fastgen"]["next_bytes"]


def test_fastgen_budgets_are_the_profiled_ratios(small_policy):
    plan = compile_plain(small_policy, 0.5, max_len=4000, strategy="fastgen")
    heavy = plan.has("frequency")
    assert (plan.heavy[heavy] == round(0.3 * 4000)).all()
    assert (plan.window[plan.has("local")] == 1200).all()


def test_pyramid_follows_the_pyramidkv_schedule(wide_policy):
    plan = compile_plain(wide_policy, 0.1, max_len=32768, strategy="pyramid")
    per_layer = plan.capacity.double().mean(dim=1)
    assert (per_layer[1:] <= per_layer[:-1] + 1).all()
    mean = float(per_layer.mean())
    assert float(per_layer[-1]) == pytest.approx(mean / PYRAMID_BETA, rel=0.02)
    assert float(per_layer[0]) == pytest.approx(2 * mean - mean / PYRAMID_BETA, rel=0.02)
    assert (plan.kind_codes == kind_code("frequency+local")).all()
    assert (plan.window == torch.clamp(plan.capacity, max=PYRAMID_ALPHA)).all()


def test_uniform_gives_every_head_the_same_budget(wide_policy):
    plan = compile_plain(wide_policy, 0.1, max_len=32768, strategy="uniform")
    assert int(plan.capacity.max() - plan.capacity.min()) <= 1
    assert (plan.window == 32).all() and (plan.kind_codes == kind_code("frequency+local")).all()


def test_allocate_slots_respects_bounds_and_total():
    rng = np.random.default_rng(0)
    for _ in range(200):
        heads = int(rng.integers(1, 40))
        high = int(rng.integers(1, 500))
        total = int(rng.integers(heads, heads * high + 1))
        slots = allocate_slots(rng.random(heads) + 0.01, total, high)
        assert slots.sum() == total and slots.min() >= 1 and slots.max() <= high
    assert allocate_slots(np.ones(3), 10**6, 100).tolist() == [100, 100, 100]


def test_pyramid_weights_mean_one():
    weights = pyramid_weights(32)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[0] == pytest.approx(2 - 1 / 20) and weights[-1] == pytest.approx(1 / 20)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_memory_is_planned_per_kv_head_never_per_query_head(small_policy, strategy):
    """GQA: 8 query heads share 2 KV heads; the full cache and every plan count KV heads only."""
    plan = compile_plain(small_policy, 0.25, max_len=2048, strategy=strategy, dtype="fp16", batch=3)
    model = small_policy.model
    assert plan.capacity.shape == (model.num_layers, model.num_kv_heads)
    assert plan.full_cache_bytes == model.num_layers * model.num_kv_heads * 2048 * model.head_dim * 2 * 2 * 3
    slots = int(plan.capacity.sum())
    assert plan.kv_bytes == slots * model.head_dim * 2 * DTYPE_BYTES["float16"] * 3
    assert plan.position_bytes == slots * POSITION_BYTES * 3


def test_retrieval_keeps_the_copying_heads_whole_and_splits_the_rest_evenly(wide_policy):
    plan = compile_plain(wide_policy, 0.25, max_len=8192, strategy="retrieval")
    scores = np.array([head.retrieval for head in kv_heads(wide_policy)]).reshape(plan.capacity.shape)
    full = plan.has("full").numpy()
    chosen = plan.notes["retrieval"]["heads"]
    assert full.sum() == len(chosen) > 0 and all(full[layer, head] for layer, head in chosen)
    assert scores[full].min() >= RETRIEVAL_THRESHOLD and scores[full].min() >= scores[~full].max() - 1e-12
    assert full.sum() * 8192 * (plan.cache_bytes / int(plan.capacity.sum())) <= RETRIEVAL_SHARE * plan.target.budget_bytes + 1
    rest = plan.capacity[~plan.has("full")]
    assert int(rest.max() - rest.min()) <= 1
    assert (plan.window[~plan.has("full")] == 32).all()
    assert (plan.kind_codes[~plan.has("full")] == kind_code("frequency+local")).all()


def test_retrieval_gives_fewer_heads_everything_when_memory_is_short(wide_policy):
    eligible = sum(head.retrieval >= RETRIEVAL_THRESHOLD for head in kv_heads(wide_policy))
    counts = [int(compile_plain(wide_policy, t, max_len=8192, strategy="retrieval").has("full").sum()) for t in TARGETS]
    assert counts == sorted(counts) and counts[0] < eligible and counts[-1] == eligible


def test_retrieval_needs_retrieval_scores(wide_policy):
    older = copy.deepcopy(wide_policy)
    for head in kv_heads(older):
        head.retrieval = None
    with pytest.raises(KvcError, match="no retrieval scores.*kvc profile"):
        compile_plain(older, 0.25, max_len=8192, strategy="retrieval")


def test_a_higher_retrieval_threshold_keeps_fewer_heads_whole(wide_policy):
    scores = sorted((head.retrieval for head in kv_heads(wide_policy)), reverse=True)
    threshold = (scores[1] + scores[2]) / 2  # exactly the two best heads clear it
    plan = compile_plain(wide_policy, 0.6, max_len=8192, strategy="retrieval", retrieval_threshold=threshold)
    assert int(plan.has("full").sum()) == 2 and plan.notes["retrieval"]["threshold"] == threshold
    default = compile_plain(wide_policy, 0.6, max_len=8192, strategy="retrieval")
    assert int(default.has("full").sum()) > 2 and default.notes["retrieval"]["threshold"] == RETRIEVAL_THRESHOLD
    assert plan.capacity[~plan.has("full")].min() > default.capacity[~default.has("full")].min()  # the rest get more


@pytest.mark.parametrize("strategy, threshold, message", [
    ("knapsack", 0.1, "applies to the retrieval strategy"),
    ("retrieval", 1.5, "outside \\[0, 1\\]"),
])
def test_retrieval_threshold_errors(wide_policy, strategy, threshold, message):
    with pytest.raises(KvcError, match=message):
        compile_plain(wide_policy, 0.25, max_len=8192, strategy=strategy, retrieval_threshold=threshold)
