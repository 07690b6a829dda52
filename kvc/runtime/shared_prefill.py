"""One prompt prefilled once into several compressed caches: `SharedPrefill(caches)`.

A compressed cache's prefill runs the model's usual attention and only then stores each head's
keep-set, so the forward is the same whatever the plan. Passed as the cache of that forward
(`model(input_ids=prompt, cache=SharedPrefill(caches))`), it hands each layer's keys, values and
query window to every member cache, which ends in the state a prefill of its own would leave: each
then extends and decodes alone. The evaluation prefills a context once for every method this way.
"""

from __future__ import annotations

from transformers.cache_utils import Cache, CacheLayerMixin

from kvc.runtime.cache import CompressedCache, CompressedLayer


class SharedLayer(CacheLayerMixin):
    """One layer of the shared prefill: the same layer of every member cache."""

    is_compileable = False
    is_croppable = False
    prefilling = True  # it serves the prefill only; the members extend

    def __init__(self, members: list[CompressedLayer]):
        super().__init__()
        self.members = members
        self.is_sliding = members[0].is_sliding

    def lazy_initialization(self, key_states, value_states=None, *args, **kwargs) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        for member in self.members:
            member.update(key_states, value_states)
        self.is_initialized = True
        return key_states, value_states

    def compress(self, query, keys, values, scale) -> None:
        for member in self.members:
            member.compress(query, keys, values, scale)

    def get_seq_length(self):
        return 0

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        return self.members[0].get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return min(member.get_max_length() for member in self.members)

    get_max_cache_shape = get_max_length


class SharedPrefill(Cache):
    """The cache of one prefill forward whose keys and values every member cache stores by its plan.

    The members must be fresh caches of the same model (one `kvc.apply` serves them all: each
    cache carries its own plan). After the forward, use the members, not this object."""

    observes_inputs = True  # `apply`'s hooks show it the prompt, and it shows every member

    def __init__(self, caches: list[CompressedCache]):
        if not caches:
            raise ValueError("a shared prefill needs at least one cache")
        layers = [SharedLayer([cache.layers[index] for cache in caches]) for index in range(len(caches[0].layers))]
        super().__init__(layers=layers)
        self.caches = caches

    def observe(self, input_ids, attention_mask) -> None:
        for cache in self.caches:
            cache.observe(input_ids, attention_mask)

    def finish(self) -> None:
        for cache in self.caches:
            cache.finish()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)
