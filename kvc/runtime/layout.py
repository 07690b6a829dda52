"""The static layout of one layer's compressed cache, read off the plan once.

Each KV head owns a segment of the layer's flat buffer. Inside it, the filled slots are kept
packed at the front as four groups in a fixed order: sinks, class tokens (special and
punctuation), heavy hitters, recent window. Each group has the quota the plan gives it; the
per-slot positions table and the group counts are all the runtime needs to evict.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from kvc.plan import Plan
from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT

SINK, CLASS, HEAVY, WINDOW = range(4)
GROUPS = ("sink", "class", "heavy", "window")
NO_GROUP = len(GROUPS)  # a new token this head does not keep

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LayerLayout:
    """Per-KV-head tables of one layer (all on one device), and the layer's buffer sizes.

    quotas (kv_heads, 4): slots of the sink, class, heavy and window groups. The window quota is
    the plan's window plus its full slots (a full head is a window that never wraps); on a
    sliding-window layer it is clamped to the model's window, so no head attends further back
    through its window than the model does.
    """

    offsets: torch.Tensor  # (kv_heads,) int64 first slot of each head
    capacities: torch.Tensor  # (kv_heads,) int64
    quotas: torch.Tensor  # (kv_heads, 4) int64
    class_bits: torch.Tensor  # (kv_heads,) uint8 token-class bits a head keeps (special 1, punct 2)
    frequency: torch.Tensor  # (kv_heads,) bool heads that keep heavy hitters by accumulated attention
    score_offsets: torch.Tensor  # (kv_heads,) int64 first score of each frequency head (0 for others)
    frequency_heads: torch.Tensor  # (frequency heads,) int64 their head indices
    frequency_slots: torch.Tensor  # (score_slots,) int64 the slots that carry a score, in score order
    total_slots: int
    score_slots: int
    max_capacity: int

    @classmethod
    def from_plan(cls, plan: Plan, layer: int, sliding_window: int | None = None) -> LayerLayout:
        capacities = plan.capacity[layer].to(torch.int64)
        offsets = plan.offsets[layer].to(torch.int64)
        frequency = plan.has("frequency")[layer]
        window = (plan.window[layer] + plan.full_slots[layer]).to(torch.int64)
        if sliding_window is not None:
            window = window.clamp(max=sliding_window)
        heavy = torch.where(frequency, plan.heavy[layer].to(torch.int64), 0)
        quotas = torch.stack([plan.sinks[layer].to(torch.int64), plan.class_slots[layer].to(torch.int64),
                              heavy, window], dim=1)
        class_bits = (plan.has("special")[layer].to(torch.uint8) * SPECIAL_BIT
                      | plan.has("punct")[layer].to(torch.uint8) * PUNCT_BIT)
        scored = torch.where(frequency, capacities, 0)
        score_offsets = torch.cumsum(scored, 0) - scored
        frequency_slots = torch.cat([torch.arange(int(o), int(o) + int(c)) for o, c in zip(offsets, scored)])
        return cls(
            offsets=offsets, capacities=capacities, quotas=quotas, class_bits=class_bits, frequency=frequency,
            score_offsets=torch.where(frequency, score_offsets, 0), frequency_heads=frequency.nonzero()[:, 0],
            frequency_slots=frequency_slots.to(torch.int64),
            total_slots=int(capacities.sum()), score_slots=int(scored.sum()),
            max_capacity=int(capacities.max()) if len(capacities) else 0,
        )

    @property
    def num_kv_heads(self) -> int:
        return len(self.offsets)

    @property
    def has_frequency(self) -> bool:
        return self.score_slots > 0

    @property
    def stored_heads(self) -> torch.Tensor:
        """(heads,) int64 the heads with at least one slot."""
        return (self.capacities > 0).nonzero()[:, 0]

    def restricted(self, heads: torch.Tensor) -> LayerLayout:
        """The same buffer seen through a subset of its heads (renumbered 0..len(heads)-1)."""
        frequency = self.frequency[heads]
        return replace(
            self, offsets=self.offsets[heads], capacities=self.capacities[heads], quotas=self.quotas[heads],
            class_bits=self.class_bits[heads], frequency=frequency, score_offsets=self.score_offsets[heads],
            frequency_heads=frequency.nonzero()[:, 0],
            max_capacity=int(self.capacities[heads].max()) if len(heads) else 0,
        )

    def to(self, device) -> LayerLayout:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return LayerLayout(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})
