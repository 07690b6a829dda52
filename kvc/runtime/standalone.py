"""The compressed cache without transformers, for serving engines: a plan, per-layer stores, two calls.

    plan = Plan.load("model.plan")                                   # from kvc.plan import Plan
    cache = CompressedKV(plan, batch=1, device="cuda")               # the plan's memory, allocated once
    # prefill, per layer, after the engine's own prompt attention:
    cache.prefill(layer, keys, values, token_ids, query_window=queries[:, :, -32:])
    # then any number of new tokens at a time, per layer, instead of the engine's attention:
    output = cache.extend(layer, queries, keys, values, token_ids)   # (batch, q_heads, chunk, head_dim)
    output = cache.decode(layer, query, key, value, token_id)        # one token: (batch, q_heads, head_dim)

keys/values (batch, kv_heads, length, head_dim) after RoPE; queries (batch, q_heads, chunk,
head_dim); token_ids (batch, length); for `decode` the chunk dimension is dropped.
"""

from __future__ import annotations

import torch

from kvc.plan import Plan
from kvc.runtime.selection import padding_start
from kvc.runtime.store import LayerStore, storage_bytes
from kvc.runtime.token_classes import TokenClasses


class CompressedKV:
    """A plan's compressed KV cache for `batch` sequences (at most the plan's batch) on `device`.

    sliding_windows: per layer, the model's sliding attention window or None (default: none);
    kernels: 'auto' (Triton on CUDA, torch references elsewhere), 'triton' or 'reference'.
    """

    def __init__(self, plan: Plan, batch: int = 1, device="cpu", sliding_windows=None, kernels: str = "auto"):
        windows = sliding_windows or [None] * plan.num_layers
        self.plan = plan
        self.layers = [LayerStore(plan, layer, windows[layer], kernels) for layer in range(plan.num_layers)]
        for store in self.layers:
            store.allocate(batch, device)
        self.token_classes = TokenClasses(plan.token_classes, device)

    def prefill(self, layer: int, keys, values, token_ids, query_window=None, attention_mask=None, scale=None):
        """Store a layer's keep-sets of the prompt.

        token_ids (batch, length); attention_mask (batch, length) for left-padded prompts;
        query_window (batch, q_heads, window, head_dim): the prompt's last queries (after RoPE),
        needed when the layer has frequency heads (the plan's `observation_window` of them).
        """
        batch, length = token_ids.shape
        start = padding_start(attention_mask, batch, length, keys.device)
        self.layers[layer].prefill(keys, values, self.token_classes(token_ids), start, query_window, scale)

    def extend(self, layer: int, queries, keys, values, token_ids, scale=None) -> torch.Tensor:
        """Attend a chunk of new tokens (to the layer's slots and causally to itself), then admit them."""
        return self.layers[layer].extend(queries, keys, values, self.token_classes(token_ids), scale)

    def decode(self, layer: int, query, key, value, token_id, scale=None) -> torch.Tensor:
        """`extend` by one token per sequence: query (batch, q_heads, head_dim), key/value (batch,
        kv_heads, head_dim), token_id (batch,); returns (batch, q_heads, head_dim)."""
        output = self.extend(layer, query[:, :, None], key[:, :, None], value[:, :, None], token_id[:, None], scale)
        return output[:, :, 0]

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds: the plan's `cache_bytes` at its batch."""
        held = [tensor for store in self.layers for tensor in store.held_tensors()]
        return storage_bytes([*held, *self.token_classes.tensors()])

    def reset(self) -> None:
        """Forget the sequences, keep the memory."""
        for store in self.layers:
            store.reset()
