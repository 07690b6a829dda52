"""The retrieval strategy: heads that copy from far back keep every token, the others share the rest.

A retrieval head that drops one digit of a number breaks the answer (DESIGN.md), and attention
mass does not say which heads those are: on SmolLM2 the knapsack over recovery curves gives the
heads that copy a passkey a 256-token window, and the passkey is lost. The profiler's retrieval
score does say it (attention on the copied token at copy events of the profiling prompts). So,
as DuoAttention does with heads it learns by training, the KV heads scoring at least
RETRIEVAL_THRESHOLD keep their whole length, the highest scores first and at most
RETRIEVAL_SHARE of the budget; every other head is SnapKV's (the 32 most recent tokens, heavy
hitters by observation-window scores) with a share of what is left. The shares follow how many
keys each head holds on to under the reconstruction probe (the policy's probe curves), read at
the one score threshold at which those heads together fill their slots: KVzip's selection of the
best keys of all heads at once, made static (`probe_shares`). A policy without probe curves gives
equal shares. Budgets following the retrieval scores (HeadKV's rule) and 3-key pooling for the
other heads were tried: better perplexity, fewer needles and passkeys on samples kept apart from
the tuning ones (docs/results.md).
"""

from __future__ import annotations

import numpy as np

from kvc.compiler.deployment import Deployment
from kvc.compiler.knapsack import BudgetTooSmall
from kvc.compiler.schedules import (
    SNAPKV_KIND,
    SNAPKV_WINDOW,
    allocate_slots,
    snapkv_head,
    snapkv_recovery,
)
from kvc.compiler.strategies import Allocation, kv_heads
from kvc.policies.errors import KvcError
from kvc.policies.schema import HeadProfile, Policy

RETRIEVAL_THRESHOLD = 0.02
RETRIEVAL_SHARE = 0.5


def retrieval_scores(policy: Policy) -> np.ndarray:
    """(KV heads,) retrieval scores, layer-major; an error for a policy profiled without them."""
    scores = [head.retrieval for head in kv_heads(policy)]
    if any(score is None for score in scores):
        raise KvcError("the policy has no retrieval scores (profiled by an older kvc, or on prompts without "
                       "repeated text); profile the model again with `kvc profile`, or use --strategy knapsack")
    return np.array(scores, dtype=float)


def retrieval_heads(scores: np.ndarray, full_cost: int, budget: int, threshold: float = RETRIEVAL_THRESHOLD) -> list[int]:
    """The heads kept whole: scores >= threshold, best first, within RETRIEVAL_SHARE of the budget."""
    order = np.argsort(-scores, kind="stable")
    eligible = [int(i) for i in order if scores[i] >= threshold]
    return eligible[:int(RETRIEVAL_SHARE * budget) // full_cost]


def probe_shares(heads: list[HeadProfile], slots: int, max_len: int) -> np.ndarray | None:
    """Each head's share of `slots`: the share of its keys scoring at least the one threshold at
    which the heads' shares of `max_len` add up to `slots`, read off the profiled probe curves
    (linear in log score between points); None when a head has no probe curve."""
    curves = [head.probe_curve for head in heads]
    if not curves or any(curve is None for curve in curves):
        return None
    logs = np.log(np.array([curve.points for curve in curves]))
    shares = np.array([curve.recovery for curve in curves])

    def at(log_score: float) -> np.ndarray:
        return np.array([np.interp(log_score, x, y) for x, y in zip(logs, shares)])

    low, high = logs.min(), logs.max()  # the sum of shares falls as the threshold rises
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if at(middle).sum() * max_len > slots else (low, middle)
    chosen = at(high)
    return chosen if chosen.sum() > 0 else at(low)


def plan_retrieval(policy: Policy, deployment: Deployment, budget: int,
                   threshold: float = RETRIEVAL_THRESHOLD) -> Allocation:
    heads = kv_heads(policy)
    full = deployment.full_head()
    unit = deployment.slot_bytes(SNAPKV_KIND)
    if len(heads) * unit > budget:
        raise BudgetTooSmall(len(heads) * unit)
    chosen = retrieval_heads(retrieval_scores(policy), deployment.cost(full), budget, threshold)
    while chosen and (len(heads) - len(chosen)) * unit > budget - len(chosen) * deployment.cost(full):
        chosen.pop()  # the other heads need a slot each
    whole = set(chosen)
    others = [i for i in range(len(heads)) if i not in whole]
    total = (budget - len(chosen) * deployment.cost(full)) // unit
    shares = probe_shares([heads[i] for i in others], total, deployment.max_len)
    if shares is None:
        slots = allocate_slots(np.ones(len(others)), total, deployment.max_len)
    else:  # a recent window each (as the budget allows), the slots beyond it by the shares
        window = max(0, min(SNAPKV_WINDOW, total // len(others) - 1, deployment.max_len - 1))
        slots = window + allocate_slots(shares, total - window * len(others), deployment.max_len - window)
    plans = [full] * len(heads)
    for index, count in zip(others, slots):
        plans[index] = snapkv_head(int(count), SNAPKV_WINDOW)
    recovery = [snapkv_recovery(profile, plan, policy.profile, deployment.max_len)
                for profile, plan in zip(heads, plans)]
    per_layer = deployment.num_kv_heads
    notes = {"retrieval": {"threshold": threshold, "window": SNAPKV_WINDOW,
                           "heads": [[i // per_layer, i % per_layer] for i in sorted(chosen)],
                           "budgets": "equal" if shares is None else "probe",
                           "slots": [int(slots.min()), int(slots.max())] if len(others) else []}}
    return Allocation(plans, recovery, notes)
