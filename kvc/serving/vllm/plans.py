"""The plan an engine serves, as each of vLLM's processes finds it: a path in KVC_VLLM_PLAN.

`kvc serve` and `llm()` set the variable before vLLM starts; its engine and worker processes
inherit it, and vLLM's plugin hooks (which take no arguments of kvc's) read the plan from it once.
"""

from __future__ import annotations

import os
from functools import lru_cache

from kvc.plan import Plan
from kvc.runtime.token_classes import TokenClasses

PLAN_ENV = "KVC_VLLM_PLAN"


def plan_requested() -> bool:
    return bool(os.environ.get(PLAN_ENV))


@lru_cache(maxsize=4)
def _load(path: str) -> Plan:
    return Plan.load(path)


def served_plan() -> Plan:
    """The plan named by KVC_VLLM_PLAN (loaded once per process)."""
    return _load(os.environ[PLAN_ENV])


def rank_plan() -> Plan:
    """The heads of the served plan this tensor-parallel rank holds (all of them without parallelism)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return _rank_slice(os.environ[PLAN_ENV], get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())


def all_rank_plans() -> list[Plan]:
    """The served plan's slice of every tensor-parallel rank, in rank order."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    ranks = get_tensor_model_parallel_world_size()
    return [_rank_slice(os.environ[PLAN_ENV], rank, ranks) for rank in range(ranks)]


def rank_layer_offsets() -> list[int]:
    """Where this rank puts each layer's page in a request's block (`pages.layer_offsets`): every
    layer's attention asks once, the answer is worked out once per process."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return _layer_offsets(os.environ[PLAN_ENV], get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())


@lru_cache(maxsize=16)
def _rank_slice(path: str, rank: int, ranks: int) -> Plan:
    return _load(path).rank_slice(rank, ranks)


@lru_cache(maxsize=16)
def _layer_offsets(path: str, rank: int, ranks: int) -> list[int]:
    from kvc.serving.vllm.pages import layer_offsets  # the runtime's store: not before an engine runs

    return layer_offsets(_rank_slice(path, rank, ranks))


@lru_cache(maxsize=4)
def _classes(path: str) -> TokenClasses:
    return TokenClasses(_load(path).token_classes)


def token_classes() -> TokenClasses:
    """The served plan's token-class lookup (token ids -> class bits), on the CPU."""
    return _classes(os.environ[PLAN_ENV])
