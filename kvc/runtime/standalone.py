"""The compressed cache without transformers, for serving engines: a plan, per-layer stores, two calls.

    plan = Plan.load("model.plan")                                   # from kvc.plan import Plan
    cache = CompressedKV(plan, batch=1, device="cuda")               # the plan's memory, allocated once
    # prefill, per layer, after the engine's own prompt attention:
    cache.prefill(layer, keys, values, token_ids, query_window=queries[:, :, -32:])
    # each decode step, per layer, instead of the engine's attention:
    output = cache.decode(layer, query, key, value, token_ids)       # (batch, q_heads, head_dim)

keys/values (batch, kv_heads, length, head_dim) after RoPE; query (batch, q_heads, head_dim);
key/value (batch, kv_heads, head_dim); token_ids (batch, length) then (batch,).
"""

from __future__ import annotations

import torch

from kvc.plan import Plan
from kvc.runtime.selection import padding_start
from kvc.runtime.store import LayerStore


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
        self.token_classes = plan.token_classes.to(device)

    def prefill(self, layer: int, keys, values, token_ids, query_window=None, attention_mask=None, scale=None):
        """Store a layer's keep-sets of the prompt.

        token_ids (batch, length); attention_mask (batch, length) for left-padded prompts;
        query_window (batch, q_heads, window, head_dim): the prompt's last queries (after RoPE),
        needed when the layer has frequency heads (the plan's `observation_window` of them).
        """
        batch, length = token_ids.shape
        start = padding_start(attention_mask, batch, length, keys.device)
        self.layers[layer].prefill(keys, values, self.token_classes[token_ids], start, query_window, scale)

    def decode(self, layer: int, query, key, value, token_ids, scale=None) -> torch.Tensor:
        """Write one token per sequence into a layer's cache and return its attention output."""
        return self.layers[layer].decode(query, key, value, self.token_classes[token_ids], scale)

    def nbytes(self) -> int:
        """Bytes allocated: the plan's `cache_bytes` scaled by batch / plan.target.batch."""
        return sum(store.nbytes() for store in self.layers)

    def reset(self) -> None:
        """Forget the sequences, keep the memory."""
        for store in self.layers:
            store.reset()
