"""vLLM's view of a plan's memory: a KV-cache spec whose page is one sequence's bytes of a layer, and a
manager that gives each request one block for its whole life.

Every layer's spec has its own page size (`pages.block_pages`), so vLLM groups the layers as one
`UniformTypeKVCacheSpecs`: a block is one page per layer, side by side, exactly a request's share of
the plan (under tensor parallelism, the share of the rank whose heads take the most bytes). The
manager hands a request one block at admission, whatever its length, and returns it when the
request finishes or is aborted; prefix caching has nothing to share (a page holds a sequence's
keep-sets, not a token range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.core.single_type_kv_cache_manager import CircularBufferManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from kvc.plan import Plan
from kvc.serving.vllm.pages import PAGE_ALIGNMENT


@dataclass(frozen=True, kw_only=True)
class PlanPageSpec(AttentionSpec):
    """A layer of a kvc plan: one page of `state_content_bytes` per request, one head slot, one state."""

    layer: int = 0

    @property
    def num_states(self) -> int:
        return 1

    def get_num_kernel_states(self, kernel_block_size: int) -> int:
        return 1

    @property
    def prefix_cacheable(self) -> bool:
        return False

    @property
    def uses_slot_mapping(self) -> bool:
        return False

    @property
    def block_table_token_alignment(self) -> int | None:
        return None

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return 1

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(spec, PlanPageSpec) for spec in kv_cache_specs.values())


class OnePageManager(CircularBufferManager):
    """One block per request, claimed at admission and freed on finish or abort; no prefix caching.
    (vLLM's ring-buffer manager already does exactly this, for any spec.)"""


def plan_spec(plan: Plan, pages: list[int], layer: int, like: AttentionSpec) -> PlanPageSpec:
    """The spec of `layer`, replacing the engine's own spec `like` (its block size is kept: it sets
    only the scheduler's granularity, not the memory). plan: this rank's slice of the served plan;
    pages: every layer's page, the same on all tensor-parallel ranks (`pages.block_pages`), as vLLM
    requires."""
    return PlanPageSpec(block_size=like.block_size, num_kv_heads=plan.num_kv_heads, head_size=plan.head_dim,
                        dtype=torch.int8, num_head_slots=1, state_content_bytes=pages[layer],
                        tokens_per_state=like.block_size, block_stride_alignment=PAGE_ALIGNMENT, layer=layer)


def register() -> None:
    """Make the spec and its manager known to vLLM (idempotent)."""
    KVCacheSpecRegistry.register(PlanPageSpec, OnePageManager)

