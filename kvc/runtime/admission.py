"""Where a decoded token goes in each KV head: the per-step write rule of every kind.

The new token joins the first group that takes it: sinks (while the sequence is shorter than
them), class tokens if it is one of the head's classes, else the recent window, else (frequency
heads without a window) the heavy hitters. A group with room grows by rotating the later groups
one slot along; a full one evicts: the oldest class token, the oldest window token (a ring), or the
heavy hitter with the least accumulated attention (H2O). On frequency heads the token leaving the
window competes for a heavy slot with its accumulated score. Everything is fixed-shape tensor work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvc.runtime.layout import CLASS, HEAVY, NO_GROUP, SINK, WINDOW, LayerLayout

_LATEST = torch.iinfo(torch.int32).max


@dataclass
class Admission:
    """Slot moves and the new token's slot for one decode step; slots are relative to each head's segment.

    swaps: (first, second) pairs of (batch, heads) slots to exchange, applied in order (a pair of equal
    slots is a no-op); slot (batch, heads) where the token is written if stored (batch, heads).
    """

    swaps: list[tuple[torch.Tensor, torch.Tensor]]
    slot: torch.Tensor
    stored: torch.Tensor
    counts: torch.Tensor  # (batch, heads, 4) group counts after the step


def admit(
    layout: LayerLayout,
    counts: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor | None,
    classes: torch.Tensor,
    relative_position: torch.Tensor,
) -> Admission:
    """Plan one decode step for every (sequence, head) of a layout whose heads all have slots.

    counts (batch, heads, 4) int64; positions (batch, heads, max_capacity) int32 and scores (same
    shape, float32, None without frequency heads) are per-head views of the segments; classes
    (batch,) uint8 bits of the new token; relative_position (batch,) its index after the padding.
    """
    quotas = layout.quotas  # (heads, 4)
    batch = counts.shape[0]
    begin = counts.cumsum(-1) - counts
    group = new_token_group(layout, classes, relative_position)
    stored = group != NO_GROUP
    target = group.clamp(max=WINDOW)[..., None]
    count = counts.gather(-1, target)[..., 0]
    grow = stored & (count < quotas.expand(batch, -1, -1).gather(-1, target)[..., 0])
    end = begin.gather(-1, target)[..., 0] + count

    slots = torch.arange(positions.shape[-1], device=counts.device)

    def members(g):  # (batch, heads, max_capacity) slots of group g
        return (slots >= begin[..., g, None]) & (slots < begin[..., g, None] + counts[..., g, None])

    oldest_class = positions.masked_fill(~members(CLASS), _LATEST).argmin(-1)
    oldest_window = positions.masked_fill(~members(WINDOW), _LATEST).argmin(-1)  # the ring's next victim
    replace = stored & ~grow
    graduate = replace & (group == WINDOW) & layout.frequency & (quotas[:, HEAVY] > 0)
    heavy_room = counts[..., HEAVY] < quotas[:, HEAVY]
    if scores is None:
        lowest_heavy = torch.zeros_like(oldest_window)
        promote = torch.zeros_like(graduate)
    else:
        lowest_heavy = scores.masked_fill(~members(HEAVY), float("inf")).argmin(-1)
        leaving = scores.gather(-1, oldest_window[..., None])[..., 0]
        promote = graduate & ~heavy_room & (leaving > scores.gather(-1, lowest_heavy[..., None])[..., 0])
    window_end = begin[..., WINDOW] + counts[..., WINDOW]

    # One pair per head and step: the window's rotation when an earlier group grows, or the token
    # leaving the window changing places with the heavy group's boundary (room) or weakest slot.
    rotate_window = grow & (group < WINDOW)
    moves_up = graduate & (heavy_room | promote)
    partner = torch.where(heavy_room, begin[..., WINDOW], lowest_heavy)
    none = torch.zeros_like(count)
    swaps = [(
        torch.where(rotate_window, begin[..., WINDOW], torch.where(moves_up, oldest_window, none)),
        torch.where(rotate_window, window_end, torch.where(moves_up, partner, none)),
    )]
    for later in (HEAVY, CLASS):
        rotate = grow & (group < later)
        swaps.append((torch.where(rotate, begin[..., later], none),
                      torch.where(rotate, begin[..., later] + counts[..., later], none)))

    evicted = torch.where(group == CLASS, oldest_class, torch.where(group == HEAVY, lowest_heavy, oldest_window))
    slot = torch.where(grow, end, torch.where(graduate & heavy_room, window_end, evicted))
    slot = torch.where(stored, slot, none)
    added = torch.nn.functional.one_hot(group.clamp(max=WINDOW), 4) * grow[..., None]
    added[..., HEAVY] += (graduate & heavy_room).long()
    return Admission(swaps, slot, stored, counts + added)


def new_token_group(layout: LayerLayout, classes: torch.Tensor, relative_position: torch.Tensor) -> torch.Tensor:
    """(batch, heads) int64: the group a new token joins in each head, NO_GROUP if the head drops it."""
    quotas = layout.quotas
    member = ((classes[:, None] & layout.class_bits[None, :]) != 0) & (quotas[:, CLASS] > 0)
    heavy_only = layout.frequency & (quotas[:, HEAVY] > 0)
    fallback = torch.where(quotas[:, WINDOW] > 0, WINDOW, torch.where(heavy_only, HEAVY, NO_GROUP))  # (heads,)
    group = torch.where(member, CLASS, fallback[None, :])
    return torch.where(relative_position[:, None] < quotas[:, SINK], SINK, group)
