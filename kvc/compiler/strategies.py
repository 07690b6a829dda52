"""The strategies that choose each KV head's kind from its profile: the knapsack and FastGen.

`plan_knapsack` maximises the summed profiled recovery within the budget over every head's
options (see `knapsack`). `plan_fastgen` is FastGen's rule, each head taking the cheapest policy
that recovers at least T at the profiled ratios, with T the highest threshold whose plan fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvc.compiler import knapsack
from kvc.compiler.deployment import Deployment, HeadPlan
from kvc.compiler.options import fastgen_option, head_options, stretched
from kvc.policies.errors import KvcError
from kvc.policies.kinds import FASTGEN_POLICIES
from kvc.policies.schema import Policy


@dataclass
class Allocation:
    """What a strategy decided: one HeadPlan and expected recovery per KV head, layer-major."""

    heads: list[HeadPlan]
    recovery: list[float]
    notes: dict = field(default_factory=dict)


def kv_heads(policy: Policy):
    return [head for layer in policy.layers for head in layer.heads]


def plan_knapsack(policy: Policy, deployment: Deployment, budget: int) -> Allocation:
    options = [head_options(head, deployment, policy.profile) for head in kv_heads(policy)]
    selection = knapsack.greedy(options, budget)
    heads, recovery = [], []
    for choices, index, steps in zip(options, selection.choice, selection.steps):
        option = choices[index]
        if steps:
            head, value = stretched(option, choices[option.next], steps)
        else:
            head, value = option.head, option.recovery
        heads.append(head)
        recovery.append(value)
    count = len(options)
    best = sum(max(option.recovery for option in choices) for choices in options)
    return Allocation(heads, recovery, {"knapsack": {
        "recovery_bound": round(selection.bound / count, 6),
        "options_per_head": round(sum(map(len, options)) / count, 1),
        "saturated": selection.recovery >= best - 1e-9,
    }})


def fastgen_table(policy: Policy, deployment: Deployment) -> tuple[list[list[HeadPlan]], np.ndarray, np.ndarray]:
    """Per KV head, FastGen's policies in order: their plans, costs and recoveries (NaN where
    the head's table lacks one; `full` always recovers 1)."""
    profile = policy.profile
    plans, costs, recoveries = [], [], []
    for layer in policy.layers:
        for head in layer.heads:
            if not head.fastgen:
                raise KvcError(f"layers[{layer.index}].heads[{head.index}].fastgen: empty; the fastgen strategy "
                               "needs each head's FastGen recovery table (profile the model again)")
            row = [fastgen_option(kind, head.fastgen.get(kind, 1.0 if kind == "full" else np.nan), head,
                                  deployment, profile.local_ratio, profile.frequency_ratio) for kind in FASTGEN_POLICIES]
            plans.append([option.head for option in row])
            costs.append([option.cost for option in row])
            recoveries.append([option.recovery if option.head.capacity else np.nan for option in row])
    return plans, np.array(costs, dtype=np.int64), np.array(recoveries, dtype=float)


def fastgen_choice(recoveries: np.ndarray, threshold: float) -> np.ndarray:
    """(heads,) index of the cheapest FastGen policy recovering at least `threshold` (full at worst)."""
    meets = recoveries >= threshold
    meets[:, -1] = True
    return meets.argmax(axis=1)


def plan_fastgen(policy: Policy, deployment: Deployment, budget: int) -> Allocation:
    plans, costs, recoveries = fastgen_table(policy, deployment)
    rows = np.arange(len(costs))

    def cost(threshold: float) -> int:
        return int(costs[rows, fastgen_choice(recoveries, threshold)].sum())

    thresholds = np.unique(recoveries[np.isfinite(recoveries)])  # cost rises with the threshold
    if cost(thresholds[0]) > budget:
        raise knapsack.BudgetTooSmall(cost(thresholds[0]))
    low, high = 0, len(thresholds) - 1  # the highest threshold that fits lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(thresholds[middle]) <= budget else (low, middle - 1)
    threshold = float(thresholds[low])
    choice = fastgen_choice(recoveries, threshold)
    notes = {"threshold": round(threshold, 6)}
    if low + 1 < len(thresholds):
        notes.update(next_threshold=round(float(thresholds[low + 1]), 6), next_bytes=cost(thresholds[low + 1]))
    return Allocation([plans[h][i] for h, i in enumerate(choice)],
                      [float(recoveries[h, i]) for h, i in enumerate(choice)], {"fastgen": notes})
