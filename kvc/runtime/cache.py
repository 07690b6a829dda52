"""`CompressedCache`: a transformers `Cache` whose layers hold only what the plan allows.

Use it as `model.generate(..., cache=CompressedCache(plan, model))` (`past_key_values=` before
transformers 5.24) after `kvc.apply(model, plan, tokenizer)`. Each layer speaks the
`CacheLayerMixin` protocol around a `LayerStore`. `update` returns the new K/V unchanged; the kvc
attention function, which finds the cache in its keyword arguments (`apply`'s input hook puts it
there), then either runs the prompt's usual attention and stores the keep-sets (prefill), or runs
the store's `extend` on the chunk (any number of new tokens: decode, a second chat turn, a
question after a cached document).

On CUDA, transformers' `generate` compiles the decode forward of any compileable cache by itself;
a compiled forward cannot advance the cache's host-side token count, so pass
`**GENERATE_OPTIONS` (kvc's own generate does) and compile with `kvc.runtime.step.Step` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.runtime.applied import applied_fingerprint, sliding_windows
from kvc.runtime.selection import padding_start
from kvc.runtime.store import LayerStore, storage_bytes
from kvc.runtime.token_classes import TokenClasses

CACHE_KEYWORD = "kvc_cache"  # the keyword the input hook adds to the model's forward for the attention function

# For model.generate with a CompressedCache: no automatic compilation (see the module docstring).
GENERATE_OPTIONS = {"disable_compile": True}


@dataclass
class ObservedInputs:
    """What the forward in progress feeds: token classes (batch, query_length) uint8 and, at
    prefill, the padding start (batch,)."""

    classes: torch.Tensor
    start: torch.Tensor | None


class CompressedLayer(CacheLayerMixin):
    """One layer of a `CompressedCache`; its memory lives in `store`."""

    is_compileable = True
    is_croppable = False

    def __init__(self, cache: CompressedCache, store: LayerStore):
        super().__init__()
        self.cache = cache
        self.store = store
        self.is_sliding = store.sliding_window is not None

    @property
    def prefilling(self) -> bool:
        return not self.store.prefilled

    def lazy_initialization(self, key_states, value_states=None, *args, **kwargs) -> None:
        if not self.store.allocated:
            self.store.allocate(key_states.shape[0], key_states.device)
        self.batch_size = key_states.shape[0]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """The new K/V go to the attention function unchanged: it stores them (prefill or extend)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def compress(self, query, keys, values, scale) -> None:
        """After prefill attention: keep each head's keep-set, drop the rest. The observation window
        is sliced from the end, so that an exported prompt length stays symbolic."""
        inputs = self.cache.observed
        window = query[:, :, -min(self.store.plan.observation_window, query.shape[2]):]
        self.store.prefill(keys, values, inputs.classes, inputs.start, window, scale)

    def extend(self, query, keys, values, scale) -> torch.Tensor:
        """Attend a chunk of new tokens and admit them: (batch, q_heads, chunk, head_dim)."""
        return self.store.extend(query, keys, values, self.cache.observed.classes, scale)

    def get_seq_length(self):
        if torch.compiler.is_compiling():  # a tensor: the compiled step must not specialise on the count
            return self.store.seen[0]
        return self.cache.length

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        # Earlier transformers releases pass the cache positions (a tensor) instead of the query length.
        length = query_length.shape[-1] if isinstance(query_length, torch.Tensor) else query_length  # int or SymInt
        # Only the prompt's attention uses the mask; a chunk's attention masks slots itself.
        return length, 0

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
    grows: `nbytes()` counts every tensor the cache holds, the plan's `cache_bytes` at its batch.
    A cache holds one prompt and whatever follows it (turns, questions, decoded tokens);
    `reset()` makes it ready for another. kernels: 'auto' (Triton on CUDA, torch references on
    CPU), 'triton' or 'reference'. probe_scoring: when a context is prefilled with a probe after it
    (`kvc.runtime.probe.prefill_context`), its frequency heads score by the probe (the default);
    False keeps the context's own last queries (the evaluation's baselines).
    """

    observes_inputs = True  # `apply`'s hooks show it each forward's input ids and count its tokens

    def __init__(self, plan: Plan, model, kernels: str = "auto", probe_scoring: bool = True):
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
        self.token_classes = TokenClasses(plan.token_classes)
        self.observed: ObservedInputs | None = None
        self.length = 0  # tokens held so far, counted on the host (the step itself never reads it)
        self.probe_scoring = probe_scoring  # whether a probe after the context scores its frequency heads

    def observe(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        """Record the token classes (and, at prefill, the padding) of the forward about to run."""
        if input_ids is None:
            raise KvcError("the compressed cache needs input_ids (token classes); inputs_embeds are not supported")
        batch, length = input_ids.shape
        prefill = not self.layers[0].store.prefilled
        start = padding_start(attention_mask, batch, length, input_ids.device) if prefill else None
        self.observed = ObservedInputs(self.token_classes(input_ids), start)
        if not torch.compiler.is_compiling():  # a compiled step leaves the host count to its caller
            self.plan.check_length(self.length + length)

    def finish(self) -> None:
        """After the forward: count its tokens (the model read the old count for their positions)."""
        if self.observed is not None and not torch.compiler.is_compiling():
            self.advance(self.observed.classes.shape[1])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.observed is None:
            raise KvcError("no input ids were observed for this forward; call kvc.apply(model, plan, tokenizer) "
                           "and pass the cache by keyword (cache=, or past_key_values= before transformers 5.24)")
        return self.layers[layer_idx].update(key_states, value_states)

    def advance(self, length: int) -> None:
        """Count `length` more tokens on the host, refusing more than the plan's max length."""
        self.plan.check_length(self.length + length)
        self.length += length

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds: slots, counters and tables (the plan's `cache_bytes`)."""
        held = [tensor for layer in self.layers for tensor in layer.store.held_tensors()]
        return storage_bytes([*held, *self.token_classes.tensors()])

    def kept_positions(self, layer: int, sequence: int = 0) -> list[torch.Tensor]:
        """Per KV head of a layer, the sorted positions (after padding) of the tokens it holds."""
        return self.layers[layer].store.kept_positions(sequence)
