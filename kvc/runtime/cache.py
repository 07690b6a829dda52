"""`CompressedCache`: a transformers `Cache` whose layers hold only what the plan allows.

Use it as `model.generate(..., cache=CompressedCache(plan, model))` (`past_key_values=` before
transformers 5.24) after `kvc.apply(model, plan, tokenizer)`. Each layer speaks the
`CacheLayerMixin` protocol around a `LayerStore`. A prefill `update` returns the prompt K/V
unchanged so attention runs as usual; the kvc attention function then stores the keep-sets. A
decode `update` writes the new token into the store, and the attention function attends over the
segments. `update` hands the layer to the attention function through `pending_layer` (the
interface does not pass the cache along).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.runtime.selection import padding_start
from kvc.runtime.store import LayerStore

# The layer whose `update` ran last in this thread and awaits its attention call.
pending_layer: ContextVar[CompressedLayer | None] = ContextVar("kvc_pending_layer", default=None)


@dataclass
class ObservedInputs:
    """What the forward in progress feeds: token classes (batch, query_length) uint8, the tokens seen
    before it, and at prefill the padding start (batch,)."""

    classes: torch.Tensor
    seen: int
    start: torch.Tensor | None


class CompressedLayer(CacheLayerMixin):
    """One layer of a `CompressedCache`; its memory lives in `store`."""

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: CompressedCache, store: LayerStore):
        super().__init__()
        self.cache = cache
        self.store = store
        self.is_sliding = store.sliding_window is not None
        self.prefilling = False

    def lazy_initialization(self, key_states, value_states=None) -> None:
        self.store.allocate(key_states.shape[0], key_states.device)
        self.batch_size = key_states.shape[0]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Prefill: return the prompt K/V for the usual attention. Decode: store the new token, return it."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        inputs = self.cache.observed
        batch, _, length, _ = key_states.shape
        assert inputs.seen == self.store.seen and inputs.classes.shape == (batch, length), \
            "the observed input ids do not belong to this forward"
        self.prefilling = self.store.seen == 0
        if not self.prefilling:
            self.store.append(key_states[:, :, 0], value_states[:, :, 0], inputs.classes[:, 0])
        return key_states, value_states

    def compress(self, query, keys, values, scale) -> None:
        """After prefill attention: keep each head's keep-set, drop the rest."""
        inputs = self.cache.observed
        window = min(self.store.plan.observation_window, query.shape[2])
        self.store.prefill(keys, values, inputs.classes, inputs.start, query[:, :, -window:], scale)
        self.prefilling = False

    def get_seq_length(self) -> int:
        return self.store.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # Earlier transformers releases pass the cache positions (a tensor) instead of the query length.
        length = query_length if isinstance(query_length, int) else query_length.shape[-1]
        return self.store.seen + length, 0

    def get_max_length(self) -> int:
        return self.store.plan.target.max_len

    get_max_cache_shape = get_max_length  # the same question under its earlier name

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store.allocated:
            self.store.reorder(beam_idx)

    def reset(self) -> None:
        self.store.reset()


class CompressedCache(Cache):
    """The compressed KV cache of one batch of sequences, laid out by a plan.

    Memory is allocated at the first forward for its batch (at most the plan's batch) and never
    grows: `nbytes()` is the plan's `cache_bytes` scaled by batch / plan.target.batch. One cache
    holds one prompt and its continuation; `reset()` makes it ready for another.
    kernels: 'auto' (Triton on CUDA, torch references on CPU), 'triton' or 'reference'.
    """

    def __init__(self, plan: Plan, model, kernels: str = "auto"):
        from kvc.runtime.apply import applied_fingerprint, sliding_windows

        if isinstance(model, LoadedModel):
            model = model.model
        fingerprint = applied_fingerprint(model)
        if fingerprint is None:
            raise KvcError("the model does not run kvc attention; call kvc.apply(model, plan, tokenizer) first")
        plan.check_model(fingerprint)
        windows = sliding_windows(model.config)
        layers = [CompressedLayer(self, LayerStore(plan, i, windows[i], kernels)) for i in range(plan.num_layers)]
        super().__init__(layers=layers)
        self.plan = plan
        self.token_classes = plan.token_classes  # (vocab,) uint8, moved to the inputs' device once
        self.observed: ObservedInputs | None = None

    def observe(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Record the token classes (and, at prefill, the padding) of the forward about to run."""
        if input_ids is None:
            raise KvcError("the compressed cache needs input_ids (token classes); inputs_embeds are not supported")
        batch, length = input_ids.shape
        seen = self.get_seq_length()
        if seen and length != 1:
            raise KvcError(f"a compressed cache continues one token at a time, got {length}; "
                           "use a new cache (or reset()) for a new prompt")
        self.plan.check_length(seen + length)
        if self.token_classes.device != input_ids.device:
            self.token_classes = self.token_classes.to(input_ids.device)
        start = None if seen else padding_start(attention_mask, batch, length, input_ids.device)
        self.observed = ObservedInputs(self.token_classes[input_ids], seen, start)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.observed is None:
            raise KvcError("no input ids were observed for this forward; call kvc.apply(model, plan, tokenizer) "
                           "and pass the cache by keyword (cache=, or past_key_values= before transformers 5.24)")
        keys, values = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        pending_layer.set(self.layers[layer_idx])
        return keys, values

    def nbytes(self) -> int:
        """Bytes allocated for keys, values, slot positions and scores: the plan's accounting."""
        return sum(layer.store.nbytes() for layer in self.layers)

    def kept_positions(self, layer: int, sequence: int = 0) -> list[torch.Tensor]:
        """Per KV head of a layer, the sorted positions (after padding) of the tokens it holds."""
        return self.layers[layer].store.kept_positions(sequence)
