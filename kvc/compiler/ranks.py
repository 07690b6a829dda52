"""Plans balanced over tensor-parallel ranks: one strategy run per rank, each with an equal share.

A serving engine gives each of N tensor-parallel ranks a contiguous range of every layer's KV
heads, and every rank's blocks are as large as the largest rank's share of a request
(`kvc.serving.vllm.pages.block_pages`). A strategy run over all heads at once spends the budget
where the profile says, not evenly over those ranges, so the rank whose heads it favours sets
every rank's memory. Compiled for N ranks, the strategy runs once per rank, over that rank's
heads with 1/N of the budget, and the N allocations are put back in the plan's head order: each
rank then holds the same bytes (to a slot), at the price of choices made within each rank's heads
rather than across all of them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from kvc.compiler.deployment import Deployment
from kvc.compiler.knapsack import BudgetTooSmall
from kvc.compiler.strategies import Allocation
from kvc.policies.errors import KvcError
from kvc.policies.schema import LayerProfile, Policy

Strategy = Callable[[Policy, Deployment, int], Allocation]


def check_ranks(ranks, num_kv_heads: int) -> int:
    """`ranks` as a count of tensor-parallel ranks that split the model's KV heads evenly (as vLLM needs)."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise KvcError(f"--tensor-parallel-size: expected a positive number of ranks, got {ranks!r}")
    if num_kv_heads % ranks:
        raise KvcError(f"--tensor-parallel-size {ranks} does not divide the model's {num_kv_heads} KV heads "
                       "(each rank holds an equal range of them)")
    return ranks


def rank_policy(policy: Policy, rank: int, ranks: int) -> Policy:
    """The profile of the KV heads rank `rank` of `ranks` holds in every layer."""
    count = policy.model.num_kv_heads // ranks
    heads = slice(rank * count, (rank + 1) * count)
    group = policy.model.num_attention_heads // policy.model.num_kv_heads
    model = replace(policy.model, num_kv_heads=count, num_attention_heads=count * group)
    layers = [LayerProfile(layer.index, layer.funnel, layer.heads[heads], layer.funnel_curve) for layer in policy.layers]
    return replace(policy, model=model, layers=layers)


def plan_by_rank(plan_heads: Strategy, policy: Policy, deployment: Deployment, budget: int, ranks: int) -> Allocation:
    """`plan_heads` run for each rank's heads with budget // ranks, its allocations in the plan's head order."""
    count = deployment.num_kv_heads // ranks
    part = replace(deployment, num_kv_heads=count)
    allocations, minima = [], []
    for rank in range(ranks):
        try:
            allocations.append(plan_heads(rank_policy(policy, rank, ranks), part, budget // ranks))
        except BudgetTooSmall as error:
            minima.append(error.minimum)
    if minima:  # every rank needs the largest share any rank needs
        raise BudgetTooSmall(max(minima) * ranks)
    heads, recovery = [], []
    for layer in range(deployment.num_layers):
        for allocation in allocations:
            heads += allocation.heads[layer * count:(layer + 1) * count]
            recovery += allocation.recovery[layer * count:(layer + 1) * count]
    notes = merged_notes([allocation.notes for allocation in allocations], count)
    notes["tensor_parallel"] = {"ranks": ranks}
    return Allocation(heads, recovery, notes)


def merged_notes(rank_notes: list[dict], count: int) -> dict:
    """One strategy's notes from its runs on each rank's `count` heads per layer (head indices made the plan's)."""
    notes = dict(rank_notes[0])
    if "retrieval" in notes:
        parts = [n["retrieval"] for n in rank_notes]
        slots = [p["slots"] for p in parts if p["slots"]]
        notes["retrieval"] = {
            **parts[0],
            "heads": sorted([layer, rank * count + head] for rank, p in enumerate(parts) for layer, head in p["heads"]),
            "budgets": "probe" if all(p["budgets"] == "probe" for p in parts) else "equal",
            "slots": [min(s[0] for s in slots), max(s[1] for s in slots)] if slots else [],
        }
    if "knapsack" in notes:
        parts = [n["knapsack"] for n in rank_notes]
        notes["knapsack"] = {
            "recovery_bound": round(sum(p["recovery_bound"] for p in parts) / len(parts), 6),
            "options_per_head": round(sum(p["options_per_head"] for p in parts) / len(parts), 1),
            "saturated": all(p["saturated"] for p in parts),
        }
    if "fastgen" in notes:  # each rank's own highest threshold that fits its share
        thresholds = [n["fastgen"]["threshold"] for n in rank_notes]
        notes["fastgen"] = {"threshold": min(thresholds), "rank_thresholds": thresholds}
    return notes
