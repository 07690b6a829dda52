"""The retrieval strategy: heads that copy from far back keep every token, the others share the rest.

A retrieval head that drops one digit of a number breaks the answer (DESIGN.md), and attention
mass does not say which heads those are: on SmolLM2 the knapsack over recovery curves gives the
heads that copy a passkey a 256-token window, and the passkey is lost. The profiler's retrieval
score does say it (attention on the copied token at copy events of the profiling prompts). So,
as DuoAttention does with heads it learns by training, the KV heads scoring at least
RETRIEVAL_THRESHOLD keep their whole length, the highest scores first and at most
RETRIEVAL_SHARE of the budget; every other head is SnapKV's (the 32 most recent tokens, heavy
hitters by observation-window scores) with an equal share of what is left. Budgets following the
scores (HeadKV's rule) and 3-key pooling for the other heads were tried: better perplexity, fewer
needles and passkeys on samples kept apart from the tuning ones (README, results).
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
from kvc.policies.schema import Policy

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
    slots = allocate_slots(np.ones(len(others)), (budget - len(chosen) * deployment.cost(full)) // unit,
                           deployment.max_len)
    plans = [full] * len(heads)
    for index, count in zip(others, slots):
        plans[index] = snapkv_head(int(count), SNAPKV_WINDOW)
    recovery = [snapkv_recovery(profile, plan, policy.profile, deployment.max_len)
                for profile, plan in zip(heads, plans)]
    per_layer = deployment.num_kv_heads
    notes = {"retrieval": {"threshold": threshold, "window": SNAPKV_WINDOW,
                           "heads": [[i // per_layer, i % per_layer] for i in sorted(chosen)]}}
    return Allocation(plans, recovery, notes)
