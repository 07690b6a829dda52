"""kvc's attention backend for vLLM (`--attention-backend CUSTOM`): a plan's compressed cache in each
request's block.

For every request of a batch the block's pages (`pages.PageViews`) become a `LayerStore`'s buffers.
A request's first chunk runs causal attention over itself and stores each head's keep-set
(prefill); every later chunk, one token (decode) or many (the rest of a prompt longer than the
scheduler's chunk), attends to the slots and to itself and is admitted (extend). Two or more
decoding requests run as one batch over copies of their pages, of which only the slots the step
wrote are written back (`LayerStore.take_writes`); a lone one, prefills and multi-token chunks one
by one, on the block's own pages, no copies (`benchmarks/bench_decode_pages.py` times the ways).
Token classes need the batch's token ids, which attention metadata lacks: kvc's worker publishes
the model runner's input-id buffer (`watch_token_ids`), laid out as the batch's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.kv_cache_interface import KVCacheLayout

from kvc.runtime.store import LayerStore
from kvc.serving.vllm.pages import PageViews, page_bytes
from kvc.serving.vllm.plans import rank_layer_offsets, rank_plan, token_classes

_token_ids: dict[str, torch.Tensor] = {}


def watch_token_ids(buffer: torch.Tensor) -> None:
    """The model runner's input ids (its first n entries are the n tokens of the batch in flight)."""
    _token_ids["buffer"] = buffer


class KvcAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # the store admits the chunk's tokens itself
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]  # the plan sets how slots are stored

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KvcAttentionImpl]:
        return KvcAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KvcMetadataBuilder]:
        return KvcMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # A block holds one page per layer side by side: a request's whole plan in one place.
        return (KVCacheLayout.BLHNC,)


@dataclass
class KvcMetadata:
    num_actual_tokens: int
    query_start: list[int]  # (requests + 1,) where each request's tokens begin in the batch
    held: list[int]  # (requests,) tokens each request's cache held before this step
    blocks: torch.Tensor  # (requests,) int64 each request's block
    token_ids: torch.Tensor  # (num_actual_tokens,) the batch's tokens

    @property
    def decoding(self) -> list[int]:
        """Requests with one new token after a prefill: they run as one batch."""
        return [i for i, held in enumerate(self.held) if held and self.query_start[i + 1] - self.query_start[i] == 1]


class KvcMetadataBuilder(AttentionMetadataBuilder[KvcMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KvcMetadata:
        metadata = common_attn_metadata
        requests, tokens = metadata.num_reqs, metadata.num_actual_tokens
        query_start = metadata.query_start_loc_cpu[:requests + 1].tolist()
        lengths = metadata.seq_lens[:requests].cpu().tolist()
        held = [length - (query_start[i + 1] - query_start[i]) for i, length in enumerate(lengths)]
        return KvcMetadata(tokens, query_start, held, metadata.block_table_tensor[:requests, 0].long(),
                           _token_ids["buffer"][:tokens].long())


class KvcAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes, sliding_window,
                 kv_cache_dtype: str, logits_soft_cap=None, attn_type: str = "decoder",
                 kv_sharing_target_layer_name=None, **unsupported):
        assert alibi_slopes is None and not logits_soft_cap and sliding_window is None, \
            "kvc's backend serves plain causal attention (no ALiBi, soft-capping or sliding windows)"
        self.num_heads, self.num_kv_heads, self.head_size, self.scale = num_heads, num_kv_heads, head_size, float(scale)
        self.store: LayerStore | None = None
        self.pages: PageViews | None = None
        self.raw: torch.Tensor | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: KvcMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        """query (tokens, q_heads, head_dim), key/value (tokens, kv_heads, head_dim) after RoPE;
        kv_cache (blocks, 1, 1, page bytes) this layer's pages; writes output (tokens, q_heads, head_dim)."""
        if attn_metadata is None:  # profiling run: nothing is cached
            return output.fill_(0)
        self._bind(layer, kv_cache)
        classes = token_classes()(attn_metadata.token_ids[None])[0]
        decoding = attn_metadata.decoding
        if len(decoding) > 1:  # a batch over copies of their pages; a lone request runs on its own page
            self._decode(decoding, query, key, value, classes, output, attn_metadata)
        else:
            decoding = []
        for request in sorted(set(range(len(attn_metadata.held))) - set(decoding)):
            self._chunk(request, query, key, value, classes, output, attn_metadata)
        return output

    def _bind(self, layer, kv_cache: torch.Tensor) -> None:
        if self.raw is not kv_cache:  # the first step after the engine allocated its cache
            plan = rank_plan()
            index = extract_layer_index(layer.layer_name)
            self.store = LayerStore(plan, index)
            start = rank_layer_offsets()[index]  # where this rank puts the layer, not the engine's page of it
            self.pages = PageViews(plan, index, whole_blocks(kv_cache)[:, start:start + page_bytes(plan, index)])
            self.raw = kv_cache

    def _chunk(self, request: int, query, key, value, classes, output, metadata: KvcMetadata) -> None:
        """A request's new tokens on their own: its prompt's first chunk (prefill) or any later one (extend)."""
        tokens = slice(metadata.query_start[request], metadata.query_start[request + 1])
        block = int(metadata.blocks[request])
        q, k, v = (_heads_first(x[tokens]) for x in (query, key, value))
        if metadata.held[request]:
            self.store.attach(self.pages.block(block), prefilled=True)
            result = self.store.extend(q, k, v, classes[None, tokens], self.scale)
        else:
            result = self._prefill(block, q, k, v, classes[None, tokens])
        output[tokens] = result[0].transpose(0, 1).to(output.dtype)

    def _prefill(self, block: int, q, k, v, classes) -> torch.Tensor:
        """Causal attention over the first chunk, then its keep-sets into the block's pages."""
        output = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        self.store.attach(self.pages.block(block))
        window = min(self.store.plan.observation_window, q.shape[2])
        start = torch.zeros(1, dtype=torch.int32, device=q.device)
        self.store.prefill(k, v, classes, start, q[:, :, -window:], self.scale)
        return output

    def _decode(self, requests: list[int], query, key, value, classes, output, metadata: KvcMetadata) -> None:
        """One new token for each of `requests`, as one batch over copies of their pages."""
        rows = torch.tensor([metadata.query_start[i] for i in requests], device=query.device)
        blocks = metadata.blocks[requests]
        state = self.pages.gather(blocks)
        self.store.attach(state, prefilled=True)
        self.store.writes = []
        result = self.store.extend(query[rows, :, None], key[rows, :, None], value[rows, :, None],
                                   classes[rows, None], self.scale)
        self.pages.scatter(blocks, state, self.store.take_writes())
        output[rows] = result[:, :, 0].to(output.dtype)


def whole_blocks(kv_cache: torch.Tensor) -> torch.Tensor:
    """(blocks, block bytes) uint8: every layer's pages of each block, from a layer's view of them.

    vLLM places the blocks of one cache group back to back in one buffer, each layer's page at its
    offset inside the block (a block-outer layout: the view's first stride is the block's bytes); a
    plan's layers are the only group, so block b is bytes [b * stride, (b + 1) * stride) of the buffer."""
    raw = kv_cache[:, 0, 0]  # (blocks, page bytes), the pages of this layer
    blocks, block = raw.shape[0], raw.stride(0)
    assert raw.storage_offset() + raw.shape[1] <= block <= kv_cache.untyped_storage().nbytes() // max(blocks, 1), \
        "kvc's pages need one cache group of block-outer pages"
    return raw.as_strided((blocks, block), (block, 1), 0).view(torch.uint8)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(tokens, heads, head_dim) -> (1, heads, tokens, head_dim)."""
    return x.transpose(0, 1)[None]
