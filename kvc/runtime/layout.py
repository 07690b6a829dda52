"""The static layout of one layer's compressed cache, read off the plan once.

Each KV head owns a segment of the layer's flat buffer, and inside it every group of tokens owns a
fixed region: sinks, class tokens (special and punctuation), heavy hitters, recent window (a full
head is a window that never wraps). A region is filled in place and never moves: sinks by their
position, class tokens and the window as rings, heavy hitters where the weakest one was. An empty
slot has position -1. So a new token costs a few index computations per head, never a search of
the segment (only heavy hitters look for their weakest member).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvc.plan import LAYOUT_FIELDS, Plan
from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT

SINK, CLASS, HEAVY, WINDOW = range(4)
GROUPS = ("sink", "class", "heavy", "window")
NO_GROUP = len(GROUPS)  # a token this head does not keep

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Columns of the (kv_heads, LAYOUT_FIELDS) int64 table; bases are absolute slots of the layer buffer.
FIELDS = ("offset", "capacity", "sink_quota", "class_base", "class_quota", "heavy_base", "heavy_quota",
          "window_base", "window_quota", "class_bits", "frequency", "score_offset")
assert len(FIELDS) == LAYOUT_FIELDS
_COLUMN = {name: index for index, name in enumerate(FIELDS)}


@dataclass(frozen=True)
class LayerLayout:
    """One layer's head table (`table`, on the cache's device) and the same numbers as Python ints.

    The ints shape the step (static loops over heads, slices of segments); the table feeds the
    vectorised admission. On a sliding-window layer the window quota is one less than the
    model's window (a new token also attends to itself), so no head sees further back than the
    model does.
    """

    table: torch.Tensor  # (kv_heads, LAYOUT_FIELDS) int64
    heads: tuple[dict[str, int], ...]  # per KV head, FIELDS -> int
    total_slots: int
    score_slots: int
    # Read off `heads` once (the step reads them every call):
    segments: tuple[tuple[int, int], ...] = ()  # per KV head (offset, capacity)
    stored_heads: tuple[int, ...] = ()  # the heads with at least one slot
    frequency_heads: tuple[int, ...] = ()  # the heads with slots and scores
    max_capacity: int = 0
    max_heavy: int = 0
    columns: dict = field(default=None, compare=False, repr=False)  # FIELDS -> (kv_heads,) view of `table`

    def __post_init__(self):
        heads = self.heads
        object.__setattr__(self, "segments", tuple((head["offset"], head["capacity"]) for head in heads))
        object.__setattr__(self, "stored_heads", tuple(i for i, head in enumerate(heads) if head["capacity"]))
        object.__setattr__(self, "frequency_heads",
                           tuple(i for i, head in enumerate(heads) if head["frequency"] and head["capacity"]))
        object.__setattr__(self, "max_capacity", max((head["capacity"] for head in heads), default=0))
        object.__setattr__(self, "max_heavy", max((head["heavy_quota"] for head in heads), default=0))
        object.__setattr__(self, "columns", {name: self.table[:, index] for name, index in _COLUMN.items()})

    @classmethod
    def from_plan(cls, plan: Plan, layer: int, sliding_window: int | None = None) -> LayerLayout:
        heads, score_offset = [], 0
        for head in range(plan.num_kv_heads):
            number = {name: int(getattr(plan, name)[layer, head])
                      for name in ("sinks", "class_slots", "heavy", "window", "full_slots")}
            capacity = int(plan.capacity[layer, head])
            offset = int(plan.offsets[layer, head]) if capacity else 0  # a head without slots points in range
            frequency = bool(plan.has("frequency")[layer, head])
            window = number["window"] + number["full_slots"]
            if sliding_window is not None:  # a new token sees itself and the window's other W - 1 tokens
                window = min(window, sliding_window - 1)
            class_base = offset + number["sinks"]
            heavy_base = class_base + number["class_slots"]
            bits = SPECIAL_BIT * bool(plan.has("special")[layer, head]) + PUNCT_BIT * bool(plan.has("punct")[layer, head])
            heads.append({
                "offset": offset, "capacity": capacity, "sink_quota": number["sinks"],
                "class_base": class_base, "class_quota": number["class_slots"],
                "heavy_base": heavy_base, "heavy_quota": number["heavy"] if frequency else 0,
                "window_base": heavy_base + number["heavy"], "window_quota": window,
                "class_bits": bits, "frequency": int(frequency), "score_offset": score_offset if frequency else 0,
            })
            score_offset += capacity if frequency else 0
        table = torch.tensor([[head[name] for name in FIELDS] for head in heads], dtype=torch.int64)
        return cls(table=table.reshape(len(heads), LAYOUT_FIELDS), heads=tuple(heads),
                   total_slots=int(plan.layer_slots[layer]), score_slots=score_offset)

    def column(self, name: str) -> torch.Tensor:
        """(kv_heads,) int64 one field of every head (a view)."""
        return self.columns[name]

    @property
    def quotas(self) -> torch.Tensor:
        """(kv_heads, 4) int64 slots of the sink, class, heavy and window groups."""
        return torch.stack([self.column(name) for name in ("sink_quota", "class_quota", "heavy_quota",
                                                          "window_quota")], 1)

    @property
    def num_kv_heads(self) -> int:
        return len(self.heads)

    @property
    def has_frequency(self) -> bool:
        return self.score_slots > 0

    def to(self, device) -> LayerLayout:
        return LayerLayout(self.table.to(device), self.heads, self.total_slots, self.score_slots)
