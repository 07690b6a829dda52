"""The retrieval strategy: each KV head's budget follows how much it copies from far back.

A retrieval head that drops one digit of a number breaks the answer (DESIGN.md), and attention
mass does not say which heads those are: on SmolLM2 the knapsack over recovery curves gives the
heads that copy a passkey a 256-token window, and the passkey is lost. The profiler's retrieval
score does say it (attention on the copied token at copy events of the profiling prompts). So,
as HeadKV does with its retrieval-reasoning scores, every KV head gets an equal part of
(1 - RETRIEVAL_SHARE) of the budget and a part of the rest in proportion to its score,
water-filled so that no head holds more than its whole length. Heads that reach it keep every
token, as DuoAttention's retrieval heads do; every other head is SnapKV's kind (the 32 most
recent tokens and heavy hitters by the observation window's attention). The copying heads
(given at least as much by score as by the equal split) max-pool those scores over 7 keys as
SnapKV does, keeping whole numbers and phrases around what they select; the others over 3, their
few slots going to the top keys themselves. The share and the pooling were chosen on samples kept
apart from the reported ones (README, results).
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

RETRIEVAL_SHARE = 0.3
COPYING_POOL_KERNEL = 7  # heads given at least as much by their score as by the equal split: SnapKV's pooling
OTHER_POOL_KERNEL = 3  # the rest: their few slots go to the top keys, not to the neighbours of fewer ones
SHOWN_HEADS = 3  # of the heads between the whole ones and the rest, the report names the largest


def retrieval_scores(policy: Policy) -> np.ndarray:
    """(KV heads,) retrieval scores, layer-major; an error for a policy profiled without them."""
    scores = [head.retrieval for head in kv_heads(policy)]
    if any(score is None for score in scores):
        raise KvcError("the policy has no retrieval scores (profiled by an older kvc, or on prompts without "
                       "repeated text); profile the model again with `kvc profile`, or use --strategy knapsack")
    return np.clip(np.array(scores, dtype=float), 0.0, None)


def retrieval_weights(scores: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(heads,) parts of the budget summing to 1: 1 - share equally, share by score (equally when
    all are 0); and (heads,) bool, the copying heads: those whose part by score is at least their equal part."""
    count = len(scores)
    total = scores.sum()
    by_score = share * (scores / total if total > 0 else np.full(count, 1 / count))
    equal = (1 - share) / count
    return equal + by_score, (by_score >= equal) & (total > 0)


def water_fill(weights: np.ndarray, deployment: Deployment, budget: int) -> np.ndarray:
    """(heads,) slots in proportion to `weights`, at most max_len; the heads held at max_len are
    costed as whole heads (slots without a score), and what that saves is shared again."""
    whole = np.zeros(len(weights), dtype=bool)
    while True:
        left = budget - int(whole.sum()) * deployment.cost(deployment.full_head())
        slots = np.full(len(weights), deployment.max_len)
        slots[~whole] = allocate_slots(weights[~whole], left // deployment.slot_bytes(SNAPKV_KIND), deployment.max_len)
        if (whole == (slots >= deployment.max_len)).all():
            return slots
        whole = slots >= deployment.max_len


def plan_retrieval(policy: Policy, deployment: Deployment, budget: int, share: float = RETRIEVAL_SHARE) -> Allocation:
    heads = kv_heads(policy)
    unit = deployment.slot_bytes(SNAPKV_KIND)  # a whole head's slots cost less: no score
    if len(heads) * unit > budget:
        raise BudgetTooSmall(len(heads) * unit)
    weights, copying = retrieval_weights(retrieval_scores(policy), share)
    slots = water_fill(weights, deployment, budget)
    plans = [deployment.full_head() if count >= deployment.max_len else snapkv_head(int(count), SNAPKV_WINDOW)
             for count in slots]
    recovery = [snapkv_recovery(profile, plan, policy.profile, deployment.max_len)
                for profile, plan in zip(heads, plans)]
    per_layer = deployment.num_kv_heads
    whole = [i for i, count in enumerate(slots) if count >= deployment.max_len]
    rest = np.delete(slots, whole)
    larger = [i for i in np.argsort(-slots, kind="stable") if slots[i] < deployment.max_len][:SHOWN_HEADS]
    notes = {"retrieval": {
        "share": share, "window": SNAPKV_WINDOW, "copying": int(copying.sum()),
        "pool_kernels": [COPYING_POOL_KERNEL, OTHER_POOL_KERNEL],
        "heads": [[i // per_layer, i % per_layer] for i in whole],
        "largest": [[int(i) // per_layer, int(i) % per_layer, int(slots[i])] for i in larger],
        "slots": [int(rest.min()), int(np.median(rest))] if len(rest) else [],
    }}
    pool = np.where(copying, COPYING_POOL_KERNEL, OTHER_POOL_KERNEL)
    return Allocation(plans, recovery, notes, pool_kernel=[int(width) for width in pool])
