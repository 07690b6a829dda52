"""Plans compiled for tensor-parallel ranks: every rank within its share of the budget, heads in place."""

from dataclasses import replace

import pytest

from kvc.compiler import STRATEGIES, compile_policy, plan_report, summary_lines
from kvc.compiler.compile import deployment_for, token_classes
from kvc.compiler.ranks import rank_policy
from kvc.compiler.schedules import SNAPKV_KIND
from kvc.plan import HEAD_TABLES, Plan
from kvc.policies.errors import KvcError
from kvc.policies.kinds import kind_code

MAX_LEN = 8192


def rank_slot_bytes(plan: Plan, ranks: int) -> list[int]:
    per_head = plan.head_bytes().sum(dim=0)
    count = plan.num_kv_heads // ranks
    return [int(per_head[rank * count:(rank + 1) * count].sum()) for rank in range(ranks)]


def share(policy, plan: Plan, ranks: int) -> int:
    deployment = deployment_for(policy, plan.target.max_len, plan.target.batch, plan.target.dtype, plan.kv_bits)
    return (plan.target.budget_bytes - deployment.overhead_bytes(token_classes(policy))) // ranks


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("ranks", [2, 4])
def test_no_rank_holds_more_than_its_share_of_the_budget(wide_policy, strategy, ranks):
    for target in (0.5, 0.25, 0.1):
        plan = compile_policy(wide_policy, target, max_len=MAX_LEN, strategy=strategy, tensor_parallel_size=ranks)
        assert max(rank_slot_bytes(plan, ranks)) <= share(wide_policy, plan, ranks)
        assert plan.cache_bytes <= plan.target.budget_bytes and plan.tensor_parallel_size == ranks


def test_the_retrieval_strategy_fills_every_ranks_share_where_one_plan_over_all_heads_does_not(wide_policy):
    ranks = 4
    balanced = compile_policy(wide_policy, 0.1, max_len=MAX_LEN, tensor_parallel_size=ranks)
    unbalanced = compile_policy(wide_policy, 0.1, max_len=MAX_LEN)
    part = share(wide_policy, balanced, ranks)
    slot = deployment_for(wide_policy, MAX_LEN, 1, balanced.target.dtype, balanced.kv_bits).slot_bytes(SNAPKV_KIND)
    assert all(part - slot < used <= part for used in rank_slot_bytes(balanced, ranks))
    assert max(rank_slot_bytes(unbalanced, ranks)) > 1.1 * part  # the favoured rank sets every rank's memory
    assert float(balanced.expected_recovery.mean()) == pytest.approx(float(unbalanced.expected_recovery.mean()), abs=0.01)


@pytest.mark.parametrize("strategy", ["retrieval", "knapsack"])
def test_each_ranks_heads_are_the_strategy_run_on_that_rank_alone(wide_policy, strategy):
    ranks = 2
    plan = compile_policy(wide_policy, 0.25, max_len=MAX_LEN, strategy=strategy, tensor_parallel_size=ranks)
    deployment = deployment_for(wide_policy, MAX_LEN, 1, plan.target.dtype, plan.kv_bits)
    part = replace(deployment, num_kv_heads=deployment.num_kv_heads // ranks)
    for rank in range(ranks):
        alone = STRATEGIES[strategy](rank_policy(wide_policy, rank, ranks), part, share(wide_policy, plan, ranks))
        expected = [(kind_code(h.kind), h.sinks, h.class_slots, h.heavy, h.window, h.full_slots) for h in alone.heads]
        held = plan.rank_slice(rank, ranks)
        assert list(zip(*(getattr(held, name).flatten().tolist() for name in HEAD_TABLES))) == expected


def test_retrieval_heads_are_named_by_their_place_in_the_plan(wide_policy):
    plan = compile_policy(wide_policy, 0.25, max_len=MAX_LEN, tensor_parallel_size=4)
    whole = plan.notes["retrieval"]["heads"]
    assert whole and any(head > 0 for _, head in whole)
    assert sorted([layer, head] for layer, head in plan.has("full").nonzero().tolist()) == whole


def test_one_rank_is_the_plan_over_all_heads(wide_policy):
    one = compile_policy(wide_policy, 0.1, max_len=MAX_LEN, tensor_parallel_size=1)
    default = compile_policy(wide_policy, 0.1, max_len=MAX_LEN)
    assert one.tensors().keys() == default.tensors().keys()
    assert all((one.tensors()[name] == tensor).all() for name, tensor in default.tensors().items())
    assert one.notes == default.notes and one.tensor_parallel_size == 1 and "tensor_parallel" not in plan_report(one)


def test_the_ranks_are_recorded_in_the_plan_and_its_report(tmp_path, wide_policy):
    plan = compile_policy(wide_policy, 0.25, max_len=MAX_LEN, tensor_parallel_size=2)
    loaded = Plan.load(plan.save(tmp_path / "tp.plan"))
    assert loaded.tensor_parallel_size == 2
    report = plan_report(loaded)
    assert report["tensor_parallel"]["ranks"] == 2
    assert report["tensor_parallel"]["rank_bytes"] == rank_slot_bytes(loaded, 2)
    assert report["tensor_parallel"]["largest_over_mean"] < 1.001
    assert any(line.startswith("compiled for 2 tensor-parallel ranks") for line in summary_lines(report))


@pytest.mark.parametrize("ranks, message", [
    (3, "--tensor-parallel-size 3 does not divide the model's 4 KV heads"),
    (8, "--tensor-parallel-size 8 does not divide the model's 4 KV heads"),
    (0, "--tensor-parallel-size: expected a positive number of ranks, got 0"),
    (True, "--tensor-parallel-size: expected a positive number of ranks, got True"),
])
def test_rank_counts_that_do_not_split_the_heads_are_refused(wide_policy, ranks, message):
    with pytest.raises(KvcError) as refused:
        compile_policy(wide_policy, 0.25, max_len=MAX_LEN, tensor_parallel_size=ranks)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


@pytest.mark.parametrize("strategy", ["retrieval", "knapsack", "pyramid"])
def test_the_smallest_plan_over_ranks_is_what_the_error_says(wide_policy, strategy):
    with pytest.raises(KvcError, match="below the smallest plan") as raised:
        compile_policy(wide_policy, 1e-6, max_len=MAX_LEN, strategy=strategy, tensor_parallel_size=4)
    minimum = int(str(raised.value).split("--memory ")[1])
    assert compile_policy(wide_policy, memory=minimum, max_len=MAX_LEN, strategy=strategy,
                          tensor_parallel_size=4).cache_bytes <= minimum
