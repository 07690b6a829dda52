"""What a plan is compiled for, and what one KV head's slots cost there.

A slot holds one token's key and value for one KV head (never repeated over its query group),
in the cache dtype or as low-bit rows, its int32 position and, on heads with a frequency
component, a float32 score, for every sequence of the batch. A head costs its capacity times
its slot bytes (`kvc.plan.slot_bytes`); the runtime's counters and tables
(`overhead_bytes`) come off the budget first: exactly what `Plan.cache_bytes` counts and the
runtime allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from kvc.plan import DTYPE_BYTES, class_members, slot_bytes, state_bytes, table_bytes
from kvc.policies.kinds import kind_components
from kvc.policies.schema import HeadProfile

components_of = lru_cache(maxsize=None)(kind_components)  # a kind is parsed once, not once per option


class HeadPlan(NamedTuple):
    """One KV head's kind and the slots of each of its components (a tuple: options are many)."""

    kind: str
    sinks: int = 0
    class_slots: int = 0
    heavy: int = 0
    window: int = 0
    full_slots: int = 0

    @property
    def capacity(self) -> int:
        return self.sinks + self.class_slots + self.heavy + self.window + self.full_slots


@dataclass(frozen=True)
class Deployment:
    max_len: int
    batch: int
    dtype: str  # a key of DTYPE_BYTES
    head_dim: int
    num_layers: int
    num_kv_heads: int
    sinks: int
    kv_bits: int = 0  # 0: keys and values in dtype; else QUANT_BITS-bit rows

    def slot_bytes(self, kind: str) -> int:
        frequency = "frequency" in components_of(kind)
        return slot_bytes(self.head_dim, self.dtype, self.kv_bits, frequency) * self.batch

    def cost(self, head: HeadPlan) -> int:
        return head.capacity * self.slot_bytes(head.kind)

    def overhead_bytes(self, token_classes) -> int:
        """What the runtime holds beside the slots (counters, tables): taken off the budget first."""
        return (state_bytes(self.num_layers, self.num_kv_heads, self.batch)
                + table_bytes(self.num_layers, self.num_kv_heads, self.head_dim, class_members(token_classes),
                              self.kv_bits))

    @property
    def full_cache_bytes(self) -> int:
        """Keys and values of every KV head at max_len: the reference every target is a fraction of."""
        width = DTYPE_BYTES[self.dtype]
        return self.num_layers * self.num_kv_heads * self.max_len * self.head_dim * 2 * width * self.batch

    def full_head(self) -> HeadPlan:
        return HeadPlan("full", full_slots=self.max_len)

    def head_plan(self, kind: str, profile: HeadProfile, heavy: int = 0, window: int = 0) -> HeadPlan:
        """A head of `kind` with the given heavy and window budgets and the fixed slots its classes need.

        Special heads hold the sinks; special and punctuation heads hold class slots for the
        profiled share of such tokens at max_len (special_fraction counts the sinks, so they
        are taken off it).
        """
        components = components_of(kind)
        if "full" in components:
            return self.full_head()
        special, punct = "special" in components, "punct" in components
        sinks = self.sinks if special else 0
        share = profile.special_fraction * special + profile.punct_fraction * punct
        class_slots = max(0, math.ceil(share * self.max_len - 1e-9) - sinks) if special or punct else 0
        return HeadPlan(
            kind=kind, sinks=sinks, class_slots=class_slots,
            heavy=heavy if "frequency" in components else 0,
            window=window if "local" in components else 0,
        )
