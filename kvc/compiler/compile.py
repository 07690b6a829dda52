"""`compile_policy`: a policy and a deployment target in, a static plan out.

Checks the request (target or memory, max length against the model's limit, batch, dtype),
turns it into a byte budget, lets the chosen strategy decide every KV head's kind and slots,
and assembles the plan's tables. A plan never takes more bytes than its budget.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from kvc.compiler.deployment import Deployment
from kvc.compiler.knapsack import BudgetTooSmall
from kvc.compiler.ranks import check_ranks, plan_by_rank
from kvc.compiler.retrieval import plan_retrieval
from kvc.compiler.schedules import plan_pyramid, plan_uniform
from kvc.compiler.sizes import format_size, parse_dtype, parse_size
from kvc.compiler.strategies import Allocation, plan_fastgen, plan_knapsack
from kvc.plan import Plan, Target, check_kv_bits
from kvc.policies.errors import KvcError
from kvc.policies.fields import check_number
from kvc.policies.kinds import kind_code
from kvc.policies.limits import MAX_BATCH, MAX_CACHE_BYTES, MAX_LEN
from kvc.policies.schema import Policy, load_policy
from kvc.policies.tokens import class_table

STRATEGIES = {"retrieval": plan_retrieval, "knapsack": plan_knapsack, "fastgen": plan_fastgen, "pyramid": plan_pyramid,
              "uniform": plan_uniform}
DEFAULT_STRATEGY = "retrieval"
DEFAULT_TARGET = 0.25
DEFAULT_KV_BITS = 8
MERGE_SIMILARITY = 0.5  # `--merge-similarity` as measured (kvc eval's kvc-merge)
MERGE_BY_DEFAULT_AT = 0.1  # the retrieval strategy merges by default at this share of the full cache or less (README)


def compile_policy(
    policy: Policy | str | Path,
    target: float | None = None,
    *,
    memory: int | str | None = None,
    max_len: int | None = None,
    batch: int = 1,
    dtype: str = "bf16",
    strategy: str = DEFAULT_STRATEGY,
    retrieval_threshold: float | None = None,
    kv_bits: int | None = None,
    merge_similarity: float | str | None = "auto",
    tensor_parallel_size: int = 1,
) -> Plan:
    """Compile `policy` (or a policy file) into a plan for one deployment.

    target: the share of the full cache's bytes at max_len the plan may use (default 0.25);
    memory: the same as an absolute size ('2GiB' or bytes), instead of target;
    max_len: the longest sequence (default: the model's max_position_embeddings);
    strategy: 'retrieval' (retrieval heads whole, SnapKV elsewhere), 'knapsack', 'fastgen', 'pyramid'
    or 'uniform';
    retrieval_threshold: the retrieval strategy's least retrieval score of a head kept whole
    (default RETRIEVAL_THRESHOLD): higher keeps fewer heads whole and gives the others more;
    kv_bits: store keys and values as 2, 4 or 8-bit codes with float16 group parameters, so that the
    same bytes hold more tokens (default DEFAULT_KV_BITS; 0: in dtype);
    merge_similarity: SnapKV-style heads fold each prompt token they evict into the heavy hitter whose
    key is nearest (in a context prefilled before its questions, the nearest kept token but a sink),
    when the keys' cosine similarity is at least this (`kvc.runtime.merging`); None or 'off' drops
    evicted tokens, as the published methods do; 'auto' (default) merges at MERGE_SIMILARITY for the
    retrieval strategy at MERGE_BY_DEFAULT_AT of the full cache or less, where it measured better, and
    drops them otherwise;
    tensor_parallel_size: the ranks a serving engine splits each layer's KV heads over: the strategy
    runs once per rank's heads with an equal share of the budget, so that every rank holds the same
    bytes (`kvc.compiler.ranks`); 1 (default) chooses over all heads at once.
    """
    if not isinstance(policy, Policy):
        policy = load_policy(policy)
    if strategy not in STRATEGIES:
        raise KvcError(f"--strategy: unknown strategy {strategy!r} (expected one of {', '.join(STRATEGIES)})")
    plan_heads = STRATEGIES[strategy]
    if retrieval_threshold is not None:
        if strategy != "retrieval":
            raise KvcError(f"--retrieval-threshold applies to the retrieval strategy, not {strategy!r}")
        if not 0.0 <= retrieval_threshold <= 1.0:
            raise KvcError(f"--retrieval-threshold: {retrieval_threshold:g} is outside [0, 1] (a share of attention)")
        plan_heads = functools.partial(plan_retrieval, threshold=retrieval_threshold)
    if check_ranks(tensor_parallel_size, policy.model.num_kv_heads) > 1:
        plan_heads = functools.partial(plan_by_rank, plan_heads, ranks=tensor_parallel_size)
    kv_bits = DEFAULT_KV_BITS if kv_bits is None else kv_bits
    deployment = deployment_for(policy, max_len, batch, parse_dtype(dtype), kv_bits)
    goal = target_for(deployment, target, memory)
    merge_similarity = merging_for(merge_similarity, strategy, goal)
    overhead = deployment.overhead_bytes(token_classes(policy))
    try:
        allocation = plan_heads(policy, deployment, goal.budget_bytes - overhead)
    except BudgetTooSmall as error:
        raise below_minimum(strategy, deployment, goal, error.minimum + overhead) from None
    plan = assemble(policy, deployment, goal, strategy, allocation, merge_similarity)
    assert plan.cache_bytes <= goal.budget_bytes, (plan.cache_bytes, goal.budget_bytes)
    return plan


def merging_for(merge_similarity: float | str | None, strategy: str, goal: Target) -> float | None:
    """The plan's merge similarity from `--merge-similarity`: a number, 'off' (or None), or 'auto'."""
    if merge_similarity is None or merge_similarity == "off":
        return None
    if merge_similarity == "auto":
        return MERGE_SIMILARITY if strategy == "retrieval" and goal.fraction <= MERGE_BY_DEFAULT_AT else None
    if isinstance(merge_similarity, str):
        try:
            merge_similarity = float(merge_similarity)
        except ValueError:
            raise KvcError(f"--merge-similarity: expected auto, off or a cosine similarity in [-1, 1], "
                           f"got {merge_similarity!r}") from None
    return check_number(merge_similarity, "--merge-similarity", -1.0, 1.0)


def deployment_for(policy: Policy, max_len: int | None, batch: int, dtype: str, kv_bits: int = 0) -> Deployment:
    model = policy.model
    check_kv_bits(kv_bits, model.head_dim)
    limit = model.max_position_embeddings
    if max_len is None:
        if not limit:
            raise KvcError("the policy does not record the model's context length; give --max-len")
        max_len = limit
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= MAX_LEN:
        raise KvcError(f"--max-len: expected a positive number of tokens up to {MAX_LEN}, got {max_len!r}")
    if limit and max_len > limit:
        raise KvcError(f"--max-len {max_len} is above {model.name}'s limit of {limit} positions "
                       "(model.max_position_embeddings)")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise KvcError(f"--batch: expected a positive number of sequences up to {MAX_BATCH}, got {batch!r}")
    return Deployment(max_len=max_len, batch=batch, dtype=dtype, head_dim=model.head_dim,
                      num_layers=model.num_layers, num_kv_heads=model.num_kv_heads, sinks=policy.profile.sinks,
                      kv_bits=kv_bits)


def target_for(deployment: Deployment, target: float | None, memory) -> Target:
    """The budget in bytes from a fraction of the full cache or an absolute memory size."""
    full = deployment.full_cache_bytes
    if target is not None and memory is not None:
        raise KvcError("give --target or --memory, not both")
    if memory is not None:
        budget = parse_size(memory)
        fraction = budget / full
    else:
        fraction = DEFAULT_TARGET if target is None else target
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise KvcError(f"--target: expected a share of the full cache in (0, 1], got {fraction!r}")
        budget = int(fraction * full)
    if budget > MAX_CACHE_BYTES:
        asked = f"--memory {format_size(budget)}" if memory is not None else f"--target {fraction:g} of {format_size(full)}"
        raise KvcError(f"the budget ({asked}) is above kvc's bound of {format_size(MAX_CACHE_BYTES)} for one plan's "
                       "cache; lower --max-len, --batch, --target or --memory")
    return Target(max_len=deployment.max_len, batch=deployment.batch, dtype=deployment.dtype,
                  budget_bytes=budget, fraction=round(float(fraction), 9))


def below_minimum(strategy: str, deployment: Deployment, goal: Target, minimum: int) -> KvcError:
    fraction = round_up(minimum / deployment.full_cache_bytes)
    at_least = f"--target {fraction} or --memory {minimum}" if fraction <= 1 else f"--memory {minimum}"
    return KvcError(
        f"the target of {format_size(goal.budget_bytes)} ({100 * goal.fraction:.3g}% of the full cache) is below "
        f"the smallest plan the {strategy} strategy can make for this policy at max length {deployment.max_len}, "
        f"batch {deployment.batch}, {deployment.dtype}: {format_size(minimum)}, that is {at_least}"
    )


def round_up(fraction: float, digits: int = 3) -> float:
    """`fraction` rounded up to `digits` significant digits, so a target of it surely fits."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(fraction)))
    return math.ceil(fraction * scale) / scale


def token_classes(policy: Policy) -> torch.Tensor:
    special, punctuation = policy.tokens.special, policy.tokens.punctuation
    vocab_size = policy.model.vocab_size or max(special + punctuation, default=-1) + 1
    for name, ids in (("special", special), ("punctuation", punctuation)):
        outside = [i for i in ids if i >= vocab_size]
        if outside:
            raise KvcError(f"tokens.{name}: id {outside[0]} is outside the vocabulary (model.vocab_size {vocab_size})")
    return class_table(vocab_size, special, punctuation)


def assemble(policy: Policy, deployment: Deployment, goal: Target, strategy: str, allocation: Allocation,
             merge_similarity: float | None = None) -> Plan:
    model = policy.model
    shape = (model.num_layers, model.num_kv_heads)

    def table(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).reshape(shape)

    heads = allocation.heads
    return Plan(
        model_name=model.name, fingerprint=model.fingerprint, num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
        target=goal,
        kind_codes=table([kind_code(h.kind) for h in heads]),
        sinks=table([h.sinks for h in heads]), class_slots=table([h.class_slots for h in heads]),
        heavy=table([h.heavy for h in heads]), window=table([h.window for h in heads]),
        full_slots=table([h.full_slots for h in heads]),
        token_classes=token_classes(policy),
        expected_recovery=torch.tensor(allocation.recovery, dtype=torch.float32).reshape(shape),
        strategy=strategy,
        kv_bits=deployment.kv_bits,
        merge_similarity=merge_similarity,
        notes={"policy": {"created": policy.created, "threshold": policy.profile.threshold}, **allocation.notes},
    )
