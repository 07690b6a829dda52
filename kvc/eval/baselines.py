"""Every evaluated method as a plan for kvc's own runtime, at the same cache bytes.

A budget is a share of the full cache's bytes at the evaluated max length (K/V in the cache dtype); each
method's plan must fit in it (`full` excepted: it is the reference). Selection is always the
runtime's: StreamingLLM, H2O and the full cache are hand-made plans, SnapKV and PyramidKV the
compiler's `uniform` and `pyramid` schedules, Ada-KV a per-head split of SnapKV budgets, all
storing keys and values in the cache dtype; and kvc its own strategies with the compiler's
default low-bit rows: `kvc` the retrieval strategy (the default), `kvc-knapsack` and
`kvc-fastgen`, `kvc-plain`, the retrieval plan in the cache dtype, `kvc-4bit`, the retrieval plan
with 4-bit rows (more tokens in the same bytes), and `kvc-merge`, the retrieval plan whose heads merge
the prompt tokens they evict into their heavy hitters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvc.compiler import compile_policy
from kvc.compiler.compile import (
    DEFAULT_KV_BITS,
    MERGE_BY_DEFAULT_AT,
    MERGE_SIMILARITY,
    assemble,
    deployment_for,
    target_for,
    token_classes,
)
from kvc.compiler.deployment import Deployment
from kvc.compiler.schedules import (
    SNAPKV_KIND,
    SNAPKV_WINDOW,
    snapkv_head,
    snapkv_recovery,
)
from kvc.compiler.strategies import Allocation
from kvc.models import LoadedModel, architecture
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.policies.schema import Curve, Policy
from kvc.runtime.handmade import handmade_plan, model_token_classes

STREAMING_SINKS = 4  # StreamingLLM's attention sinks
ADAKV_ALPHA = 0.2  # Ada-KV's floor: each head keeps at least alpha times the layer's mean budget


@dataclass(frozen=True)
class Baseline:
    """How to build one method's plan: build(loaded, policy, max_len, fraction, dtype) -> Plan."""

    build: Callable[..., Plan]
    needs_policy: bool
    reference: str


def full_bytes(loaded: LoadedModel, max_len: int, dtype: str) -> int:
    """Keys and values of every KV head at max_len: what a budget is a share of."""
    return deployment(loaded, max_len, dtype).full_cache_bytes


def deployment(loaded: LoadedModel, max_len: int, dtype: str) -> Deployment:
    arch = architecture(loaded.model.config.get_text_config())
    return Deployment(max_len=max_len, batch=1, dtype=dtype, head_dim=arch.head_dim, num_layers=arch.num_layers,
                      num_kv_heads=arch.num_kv_heads, sinks=STREAMING_SINKS)


def uniform_slots(loaded: LoadedModel, max_len: int, fraction: float, dtype: str, kind: str) -> int:
    """Slots per KV head when every head is `kind` and they share the budget equally."""
    target = deployment(loaded, max_len, dtype)
    heads = target.num_layers * target.num_kv_heads
    budget = int(fraction * target.full_cache_bytes) - target.overhead_bytes(model_token_classes(loaded.model.config, loaded.tokenizer))
    slots = budget // (target.slot_bytes(kind) * heads)
    return min(slots, max_len)


def full_plan(loaded, policy, max_len, fraction, dtype) -> Plan:
    return handmade_plan(loaded.model.config, loaded.tokenizer, "full", max_len, dtype=dtype)


def streamingllm_plan(loaded, policy, max_len, fraction, dtype) -> Plan:
    """StreamingLLM: 4 sink tokens and the most recent tokens in the rest of the budget."""
    slots = uniform_slots(loaded, max_len, fraction, dtype, "special+local")
    if slots <= STREAMING_SINKS:
        raise KvcError(f"a budget of {fraction} leaves StreamingLLM no recent window at length {max_len}")
    return handmade_plan(loaded.model.config, loaded.tokenizer, "special+local", max_len, sinks=STREAMING_SINKS,
                         class_slots=0, window=slots - STREAMING_SINKS, dtype=dtype)


def h2o_plan(loaded, policy, max_len, fraction, dtype) -> Plan:
    """H2O: half heavy hitters by attention accumulated over every prompt query, half recent tokens."""
    slots = uniform_slots(loaded, max_len, fraction, dtype, "frequency+local")
    plan = handmade_plan(loaded.model.config, loaded.tokenizer, "frequency+local", max_len, sinks=0,
                         heavy=slots // 2, window=slots - slots // 2, dtype=dtype)
    plan.observation_window = max_len  # every prompt query, not SnapKV's last 32
    plan.pool_kernel = 1  # raw accumulated attention, no pooling
    plan.strategy = "h2o"
    return plan


def compiled(strategy: str, kv_bits: int | None = None, merge_similarity: float | str | None = None
             ) -> Callable[..., Plan]:
    """A compiler strategy as a method; kv_bits None: the compiler's default rows; merge_similarity:
    evicted prompt tokens merged into heavy hitters (None: dropped, as the published methods drop them;
    'auto': the compiler's default)."""
    def build(loaded, policy, max_len, fraction, dtype) -> Plan:
        return compile_policy(policy, fraction, max_len=max_len, dtype=dtype, strategy=strategy, kv_bits=kv_bits,
                              merge_similarity=merge_similarity)

    return build


def curve_values(curve: Curve, budgets: np.ndarray, max_len: int) -> np.ndarray:
    """A fraction curve's recovery at each slot count, as `recovery_at` reads it."""
    points = np.asarray(curve.points, dtype=float) * max_len
    recovery = np.asarray(curve.recovery, dtype=float)
    if points[0] > 0:
        points, recovery = np.r_[0.0, points], np.r_[0.0, recovery]
    return np.interp(budgets, points, recovery)


def adakv_split(curves: list[Curve], layer_slots: int, max_len: int, alpha: float = ADAKV_ALPHA) -> np.ndarray:
    """(heads,) slots of one layer's heads by Ada-KV's rule B_i = round((1 - alpha) f_i + alpha B).

    f_i counts head i's share of the layer's top-(H B) token scores. A frequency curve read as
    sorted scores gives them: its slope at slot b is the head's b-th largest score (made
    non-increasing), so f_i is where the marginal recoveries of the heads are equal. Rounding
    is by largest remainders, which keeps the layer's total at H B.
    """
    heads = len(curves)
    mean = layer_slots / heads
    budgets = np.arange(layer_slots + 1)
    gains = np.array([np.diff(curve_values(curve, budgets, max_len)) for curve in curves])
    gains = np.round(np.minimum.accumulate(gains, axis=1), 12)  # (heads, layer_slots): each head's scores, best first
    head, rank = np.divmod(np.arange(gains.size), layer_slots)
    order = np.lexsort((head, rank, -gains.ravel()))[:layer_slots]  # ties go to the heads in turn
    top = np.bincount(head[order], minlength=heads)
    share = (1 - alpha) * top + alpha * mean
    slots = np.floor(share + 1e-9).astype(np.int64)
    spare = layer_slots - int(slots.sum())
    slots[np.argsort(-(share - slots), kind="stable")[:spare]] += 1
    return slots


def adakv_allocation(policy: Policy, target: Deployment, budget: int) -> Allocation:
    per_head = budget // target.slot_bytes(SNAPKV_KIND) // (target.num_layers * target.num_kv_heads)
    if per_head < 1:
        raise KvcError(f"a budget of {budget} bytes leaves Ada-KV no slot per head at length {target.max_len}")
    heads, recovery = [], []
    for layer in policy.layers:
        curves = []
        for head in layer.heads:
            if "frequency" not in head.curves:
                raise KvcError(f"layers[{layer.index}].heads[{head.index}].curves.frequency: missing; "
                               "Ada-KV splits budgets by it (profile the model again)")
            curves.append(head.curves["frequency"])
        slots = np.minimum(adakv_split(curves, per_head * len(curves), target.max_len), target.max_len)
        for head, count in zip(layer.heads, slots):
            plan = snapkv_head(int(count), SNAPKV_WINDOW)
            heads.append(plan)
            recovery.append(snapkv_recovery(head, plan, policy.profile, target.max_len))
    return Allocation(heads, recovery, {"adakv": {"alpha": ADAKV_ALPHA, "window": SNAPKV_WINDOW}})


def adakv_plan(loaded, policy, max_len, fraction, dtype) -> Plan:
    """Ada-KV: SnapKV selection, equal budget per layer, split over its heads by the policy's curves."""
    target = deployment_for(policy, max_len, 1, dtype)
    goal = target_for(target, fraction, None)
    slots = goal.budget_bytes - target.overhead_bytes(token_classes(policy))
    return assemble(policy, target, goal, "adakv", adakv_allocation(policy, target, slots))


METHODS: dict[str, Baseline] = {
    "kvc": Baseline(compiled("retrieval", merge_similarity="auto"), True,
                    f"kvc: profiled retrieval heads whole, SnapKV elsewhere, {DEFAULT_KV_BITS}-bit rows, evicted "
                    f"tokens merged at {MERGE_BY_DEFAULT_AT:g} of the full cache or less"),
    "kvc-drop": Baseline(compiled("retrieval"), True, "kvc's retrieval plan, evicted prompt tokens dropped at every budget"),
    "kvc-plain": Baseline(compiled("retrieval", kv_bits=0), True, "kvc's retrieval plan with rows in the cache dtype"),
    "kvc-4bit": Baseline(compiled("retrieval", kv_bits=4), True, "kvc's retrieval plan with 4-bit rows"),
    "kvc-merge": Baseline(compiled("retrieval", merge_similarity=MERGE_SIMILARITY), True,
                          "kvc's retrieval plan, evicted prompt tokens merged at every budget"),
    "kvc-knapsack": Baseline(compiled("knapsack"), True, "kvc knapsack over profiled recovery curves"),
    "kvc-fastgen": Baseline(compiled("fastgen"), True, "FastGen 2310.01801, threshold fitted to the budget"),
    "full": Baseline(full_plan, False, "full cache"),
    "streamingllm": Baseline(streamingllm_plan, False, "StreamingLLM 2309.17453"),
    "h2o": Baseline(h2o_plan, False, "H2O 2306.14048"),
    "snapkv": Baseline(compiled("uniform", kv_bits=0), True, "SnapKV 2404.14469"),
    "pyramidkv": Baseline(compiled("pyramid", kv_bits=0), True, "PyramidKV 2406.02069"),
    "adakv": Baseline(adakv_plan, True, "Ada-KV 2407.11550"),
}


def method_plan(method: str, loaded: LoadedModel, policy: Policy | None, max_len: int, fraction: float,
                dtype: str = "float32") -> Plan:
    """`method`'s plan at `fraction` of the full cache's bytes at max_len; it never takes more."""
    baseline = METHODS[method]
    if baseline.needs_policy and policy is None:
        raise KvcError(f"method {method!r} needs a policy: give --policy POLICY (from `kvc profile`)")
    plan = baseline.build(loaded, policy, max_len, fraction, dtype)
    if method != "full":
        budget = int(fraction * full_bytes(loaded, max_len, dtype))
        assert plan.cache_bytes <= budget, (method, plan.cache_bytes, budget)
    return plan
