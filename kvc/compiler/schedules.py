"""Fixed budget schedules with SnapKV selection inside: PyramidKV's layer funnel and the uniform split.

Every head is `frequency+local`: the most recent tokens (PyramidKV's α = 8, SnapKV's observation
window of 32 for the uniform split) and the rest of its budget in heavy hitters chosen by
observation scores. Only the budgets differ: linear from 2k̄ − k̄/β at the bottom layer to k̄/β
at the top (β = 20, k̄ the mean per head) for the pyramid, k̄ everywhere for the uniform split.
"""

from __future__ import annotations

import numpy as np

from kvc.compiler.deployment import Deployment, HeadPlan
from kvc.compiler.knapsack import BudgetTooSmall
from kvc.compiler.options import recovery_at, window_curve
from kvc.compiler.strategies import Allocation, kv_heads
from kvc.policies.schema import HeadProfile, Policy, ProfileInfo

SNAPKV_KIND = "frequency+local"
SNAPKV_WINDOW = 32  # SnapKV's observation window, kept as the recent window
PYRAMID_BETA = 20
PYRAMID_ALPHA = 8


def pyramid_weights(num_layers: int, beta: float = PYRAMID_BETA) -> np.ndarray:
    """(layers,) PyramidKV's budget per layer relative to the mean: 2 − 1/β at the bottom, 1/β at the top."""
    if num_layers == 1:
        return np.ones(1)
    top, bottom = 1 / beta, 2 - 1 / beta
    return bottom + (top - bottom) * np.arange(num_layers) / (num_layers - 1)


def allocate_slots(weights: np.ndarray, total: int, high: int) -> np.ndarray:
    """Split `total` slots over heads in proportion to `weights`, each head within [1, high].

    Each head gets its weight times one common scale, held within the bounds (water-filling); the
    scale is the one at which the heads' slots add up to `total`, found by bisection (the sum grows
    with it). The shares are then rounded down and the slots left go to the largest remainders."""
    weights = np.asarray(weights, dtype=float)
    assert len(weights) <= total and (weights >= 0).all()
    if not weights.any():
        weights = np.ones(len(weights))
    total = min(total, len(weights) * high)
    filled = lambda scale: np.clip(scale * weights, 1, high)  # noqa: E731
    below, above = 0.0, high / weights[weights > 0].min()  # filled(above): every head with weight at `high`
    for _ in range(200):
        middle = (below + above) / 2
        below, above = (middle, above) if filled(middle).sum() <= total else (below, middle)
    slots = filled(below)
    whole = np.floor(slots + 1e-9).astype(np.int64)  # within [1, high] as the slots are
    spare = total - int(whole.sum())  # at most the room left below `high`, as total is
    order = np.argsort(-(slots - whole), kind="stable")
    order = order[whole[order] < high][:spare]
    whole[order] += 1
    return whole


def snapkv_head(budget: int, window: int) -> HeadPlan:
    window = min(window, budget)
    return HeadPlan(SNAPKV_KIND, heavy=budget - window, window=window)


def snapkv_recovery(profile: HeadProfile, head: HeadPlan, profiled: ProfileInfo, max_len: int) -> float:
    """A lower estimate: the union keeps at least what its heavy hitters or its window would alone."""
    if head.capacity >= max_len:
        return 1.0
    estimates = [0.0]
    if "frequency" in profile.curves:
        estimates.append(recovery_at(profile.curves["frequency"], head.heavy, max_len))
    if "local" in profile.curves:
        estimates.append(recovery_at(profile.curves["local"], head.window, max_len))
    if "local" in profile.window_curves:
        windows = window_curve(profile, "local", profiled, max_len)
        if windows.points:
            estimates.append(recovery_at(windows, head.window, 1))
    return max(estimates)


def snapkv_allocation(policy: Policy, deployment: Deployment, budget: int, weights: np.ndarray,
                      window: int, notes: dict) -> Allocation:
    heads = kv_heads(policy)
    unit = deployment.slot_bytes(SNAPKV_KIND)
    if len(heads) * unit > budget:
        raise BudgetTooSmall(len(heads) * unit)
    slots = allocate_slots(weights, budget // unit, deployment.max_len)
    plans = [snapkv_head(int(s), window) for s in slots]
    recovery = [snapkv_recovery(p, h, policy.profile, deployment.max_len) for p, h in zip(heads, plans)]
    return Allocation(plans, recovery, notes)


def plan_pyramid(policy: Policy, deployment: Deployment, budget: int) -> Allocation:
    weights = np.repeat(pyramid_weights(deployment.num_layers), deployment.num_kv_heads)
    return snapkv_allocation(policy, deployment, budget, weights, PYRAMID_ALPHA,
                             {"pyramid": {"beta": PYRAMID_BETA, "alpha": PYRAMID_ALPHA}})


def plan_uniform(policy: Policy, deployment: Deployment, budget: int, observation_window: int = SNAPKV_WINDOW) -> Allocation:
    weights = np.ones(deployment.num_layers * deployment.num_kv_heads)
    return snapkv_allocation(policy, deployment, budget, weights, observation_window,
                             {"uniform": {"window": observation_window}})
