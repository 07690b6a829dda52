"""A model and its plan as two functions of explicit tensors: the graphs `kvc export` writes.

    prefill(input_ids, attention_mask)  -> logits (batch, vocab) of the last position, *state
    step(input_ids (batch, chunk), *state) -> logits (batch, chunk, vocab), *new state

The state is every per-sequence buffer of the plan's `LayerStore`s (rows or codes and params,
positions, scores, counts, seen, start), layer by layer in `state_names` order; the plan's
tables (head layouts, rotation, token classes) are constants of the graphs. Both functions run the
model with kvc attention over a `CompressedCache` whose stores are handed the given tensors, so
the exported step is the torch runtime's step, not a second implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT
from kvc.runtime.apply import apply, cache_keyword, restore
from kvc.runtime.cache import CompressedCache
from kvc.runtime.quantize import Rows
from kvc.runtime.store import LayerStore
from kvc.runtime.token_classes import TokenClasses

INPUTS = {"prefill": ("input_ids", "attention_mask"), "step": ("input_ids",)}


@dataclass(frozen=True)
class StateTensor:
    """One tensor of the cache state as the graphs take and return it."""

    name: str  # "layer3.positions"
    shape: tuple[int, ...]
    dtype: torch.dtype


def store_state(store: LayerStore) -> dict[str, torch.Tensor]:
    """The per-sequence tensors of one layer's store, by field name (a layer without frequency
    heads has no scores)."""
    rows = {"codes": store.rows.codes, "params": store.rows.params} if store.bits else {"rows": store.rows}
    scores = {"scores": store.scores} if store.layout.has_frequency else {}
    return {**rows, "positions": store.positions, **scores, "counts": store.counts, "seen": store.seen,
            "start": store.start}


def load_state(store: LayerStore, tensors: dict[str, torch.Tensor]) -> None:
    """Hand a store the given tensors as its buffers (the step then writes into them)."""
    store.rows = Rows(tensors["codes"], tensors["params"]) if store.bits else tensors["rows"]
    if "scores" in tensors:
        store.scores = tensors["scores"]
    store.positions, store.counts = tensors["positions"], tensors["counts"]
    store.seen, store.start = tensors["seen"], tensors["start"]


def empty_state(template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh buffers shaped as a store's: empty slots (position -1), zero counters."""
    return {name: torch.full_like(tensor, -1 if name == "positions" else 0) for name, tensor in template.items()}


class ComparedTokenClasses(TokenClasses):
    """Class bits by comparing each id with every class id: ONNX has no `searchsorted`, into which
    torch decomposes `isin`."""

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids.to(torch.int32)[..., None]
        bits = (ids == self.special).any(-1).to(torch.uint8) * SPECIAL_BIT
        return bits + (ids == self.punctuation).any(-1).to(torch.uint8) * PUNCT_BIT


class CacheGraph(torch.nn.Module):
    """The model under kvc attention with a compressed cache of `batch` sequences whose buffers are
    passed in and out. Call `close()` to give the model its own attention back."""

    def __init__(self, loaded: LoadedModel, plan: Plan, batch: int = 1):
        super().__init__()
        self.model = loaded.model
        self.applied = apply(loaded, plan)
        self.keyword = cache_keyword(self.model)
        self.cache = CompressedCache(plan, self.model, kernels="reference")
        self.cache.token_classes = ComparedTokenClasses(plan.token_classes)
        device = next(self.model.parameters()).device
        self.stores = [layer.store for layer in self.cache.layers]
        for store in self.stores:
            store.allocate(batch, device)
            if not store.bits:  # rows travel in the plan's dtype and are held in float32 inside the graph:
                store.dtype = torch.float32  # onnxruntime's CPU kernels lack bfloat16 (Expand, Where, ScatterND ...)
                store.rows = store.rows.float()
        self.fields = [list(store_state(store)) for store in self.stores]
        self.templates = [{name: tensor.clone() for name, tensor in store_state(store).items()} for store in self.stores]

    def state_tensors(self) -> list[StateTensor]:
        return [StateTensor(f"layer{index}.{name}", tuple(tensor.shape), self._carried(store, name, tensor).dtype)
                for index, store in enumerate(self.stores) for name, tensor in store_state(store).items()]

    def state(self) -> list[torch.Tensor]:
        return [self._carried(store, name, tensor) for store in self.stores
                for name, tensor in store_state(store).items()]

    @staticmethod
    def _carried(store, name, tensor):
        """A state tensor as it enters and leaves the graph: rows in the plan's dtype."""
        return tensor.to(store.plan_dtype) if name == "rows" else tensor

    def load(self, tensors) -> None:
        tensors = iter(tensors)
        for store, fields in zip(self.stores, self.fields):
            # clone: the step writes into the buffers and the graph's inputs stay as they were
            given = {name: next(tensors) for name in fields}
            load_state(store, {name: (tensor.to(store.dtype) if name == "rows" else tensor).clone()
                               for name, tensor in given.items()})
            store.prefilled = True

    def run(self, input_ids, **inputs) -> torch.Tensor:
        self.cache.length = 0  # the host count is the caller's: the graphs never read it
        return self.model(input_ids=input_ids, use_cache=True, **inputs, **{self.keyword: self.cache}).logits

    def close(self) -> None:
        restore(self.model)


class PrefillGraph(CacheGraph):
    """Prompt ids and attention mask (batch, length), left-padded -> last logits and the new state."""

    def forward(self, input_ids, attention_mask):
        for store, template in zip(self.stores, self.templates):
            load_state(store, empty_state(template))
            store.prefilled = False
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers a padded prompt
        logits = self.run(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return (logits[:, -1], *self.state())


class StepGraph(CacheGraph):
    """A chunk of new ids (batch, chunk) and the state -> the chunk's logits and the new state."""

    def forward(self, input_ids, *state):
        self.load(state)
        seen, start = self.stores[0].seen, self.stores[0].start
        offsets = torch.arange(input_ids.shape[1], device=input_ids.device)
        cache_position = seen[0].long() + offsets
        position_ids = (seen - start).long()[:, None] + offsets[None, :]
        logits = self.run(input_ids, cache_position=cache_position, position_ids=position_ids)
        return (logits, *self.state())
