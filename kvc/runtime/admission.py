"""Where a new token goes in each KV head: the write rule of every kind, one token at a time.

The token joins the first group that takes it: sinks (while the sequence is shorter than them),
class tokens if it is one of the head's classes, else the recent window, else (frequency heads
without a window) the heavy hitters. Sinks sit at their position; class tokens and the window are
rings whose counters say the next slot, so the oldest is overwritten; a heavy-only head replaces its
weakest hitter (H2O). On frequency heads with a window, the token the window is about to overwrite
moves to the heavy region if it has room or beats the weakest hitter's accumulated score. All of it
is fixed-shape tensor work over (sequence, head): no search of the segment, no host decision.

`chunk_writes` admits a whole chunk into one head at once, to the same tokens: what an eager step
does with a chunk of many tokens (a later turn, a question after a document), where a loop over
the tokens would cost a few milliseconds each.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvc.runtime.layout import CLASS, HEAVY, NO_GROUP, SINK, WINDOW, LayerLayout


class Admission(NamedTuple):
    """One token's writes, as absolute slots of the layer buffer, per (sequence, head).

    First `move_from` is copied to `move_to` where `moved` (a window token graduating to the heavy
    hitters), then the new token is written at `slot` where `stored`.
    """

    slot: torch.Tensor
    stored: torch.Tensor
    move_from: torch.Tensor | None
    move_to: torch.Tensor | None
    moved: torch.Tensor | None
    counts: torch.Tensor  # (batch, heads, 2) int32 class and window tokens admitted after this one


def token_group(layout: LayerLayout, classes: torch.Tensor, relative_position: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads) int64: the group a new token joins in each head, NO_GROUP if the head drops it.

    classes (batch,) uint8 token-class bits; relative_position (batch,) the token's index after the padding.
    """
    quota = {name: layout.column(f"{name}_quota") for name in ("sink", "class", "heavy", "window")}
    member = ((classes.long()[:, None] & layout.column("class_bits")[None, :]) != 0) & (quota["class"] > 0)
    heavy_only = (layout.column("frequency") > 0) & (quota["heavy"] > 0)
    fallback = torch.where(quota["window"] > 0, WINDOW, torch.where(heavy_only, HEAVY, NO_GROUP))  # (heads,)
    group = torch.where(member, CLASS, fallback[None, :])
    return torch.where(relative_position[:, None] < quota["sink"][None, :], SINK, group)


def ring_slot(layout: LayerLayout, group: str, count: torch.Tensor) -> torch.Tensor:
    """(batch, heads) absolute slot a ring (class or window) writes next; a head without the ring
    names its own first slot (every index stays inside its head's segment)."""
    quota = layout.column(f"{group}_quota")
    return torch.where(quota > 0, layout.column(f"{group}_base") + count % quota.clamp(min=1),
                       layout.column("offset"))


def weakest_heavy(layout: LayerLayout, positions: torch.Tensor, scores: torch.Tensor):
    """Per (sequence, head) the heavy slot to fill next: an empty one, else the lowest accumulated score.

    Returns (slot (batch, heads) absolute, its score with -inf for an empty slot). Heads without
    heavy slots get their own first slot and score +inf; they never use it. Each head reads its own
    heavy region (a view of the layer's buffers), so nothing of the regions' size is built per token.
    """
    batch = positions.shape[0]
    slots, lowest = [], []
    for head in layout.heads:
        quota, base = head["heavy_quota"], head["heavy_base"]
        if not quota:
            slots.append(torch.full((batch,), head["offset"], device=positions.device))
            lowest.append(torch.full((batch,), float("inf"), device=scores.device))
            continue
        first = base - head["offset"] + head["score_offset"]
        held = scores[:, first:first + quota].masked_fill(positions[:, base:base + quota] < 0, float("-inf"))
        low, choice = held.min(-1)
        slots.append(choice + base)
        lowest.append(low)
    return torch.stack(slots, 1), torch.stack(lowest, 1)


def admit(layout: LayerLayout, counts: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor | None,
          classes: torch.Tensor, relative_position: torch.Tensor) -> Admission:
    """Plan one token's writes for every (sequence, head).

    counts (batch, heads, 2) int32 ring counters; positions (batch, slots) int32 and scores
    (batch, score slots) float32 (None without frequency heads) are the layer's buffers; classes
    (batch,) uint8 the token's class bits; relative_position (batch,) its index after the padding.
    """
    group = token_group(layout, classes, relative_position)
    class_slot = ring_slot(layout, "class", counts[..., 0])
    window_slot = ring_slot(layout, "window", counts[..., 1])
    sink_slot = layout.column("offset")[None, :] + relative_position[:, None]
    slot = torch.where(group == SINK, sink_slot, torch.where(group == CLASS, class_slot, window_slot))
    move_from = move_to = moved = None
    if scores is not None and layout.max_heavy:
        heavy_slot, lowest = weakest_heavy(layout, positions, scores)
        slot = torch.where(group == HEAVY, heavy_slot, slot)
        frequency = layout.column("frequency") > 0
        graduates = ((group == WINDOW) & frequency & (layout.column("heavy_quota") > 0)
                     & (counts[..., 1] >= layout.column("window_quota")))
        leaving = torch.where(frequency, window_slot - layout.column("offset") + layout.column("score_offset"), 0)
        score_of_leaving = scores.gather(1, leaving)
        moved = graduates & (score_of_leaving > lowest)  # an empty heavy slot scores -inf
        move_from, move_to = window_slot, heavy_slot
    stored = group != NO_GROUP
    admitted = torch.stack([group == CLASS, group == WINDOW], -1).to(torch.int32)
    slot = torch.where(stored, slot, layout.column("offset"))
    return Admission(slot, stored, move_from, move_to, moved, counts + admitted)


class ChunkWrites(NamedTuple):
    """What a chunk leaves in one head, as slots of the head's segment: `target` gets chunk token
    `token` where it is >= 0, else a copy of the segment's slot `source` (a window token that joined
    the heavy hitters; read before any write). `counts`: the class and window ring counters after it."""

    target: torch.Tensor
    token: torch.Tensor
    source: torch.Tensor
    counts: list[int]


def chunk_writes(head: dict, counts: list[int], positions: torch.Tensor, scores: torch.Tensor | None,
                 classes: torch.Tensor, relative: torch.Tensor, own: torch.Tensor | None) -> ChunkWrites:
    """A whole chunk admitted into one head at once: the tokens `admit` keeps one at a time (up to
    exact ties of scores), in slots that may differ inside the heavy region.

    Sinks land at their position and rings keep their newest tokens. The heavy hitters follow from
    two identities: where a token leaving the window replaces the weakest hitter only if it scores
    higher, the hitters after the chunk are the top H of those before it and of the tokens that left;
    where every new token replaces the weakest (heads without a window), they are the chunk's last
    token and the top H - 1 of those before and of the chunk's other tokens. head: one row of the
    layout (`LayerLayout.heads`); counts: its class and window ring counters; positions, scores
    (capacity,) its segment's (scores None without them); classes (chunk,) uint8; relative (chunk,)
    positions after the padding; own (chunk,) the attention each chunk token received inside the
    chunk (frequency heads).
    """
    offset, device = head["offset"], positions.device
    quota = {name: head[f"{name}_quota"] for name in ("sink", "class", "heavy", "window")}
    base = {name: head[f"{name}_base"] - offset for name in ("class", "heavy", "window")}
    member = ((classes.long() & head["class_bits"]) != 0) & (quota["class"] > 0)
    sink = relative < quota["sink"]
    windowed = quota["window"] > 0
    joins = {"class": ~sink & member, "window": ~sink & ~member & windowed,
             "heavy": ~sink & ~member & (not windowed and bool(head["frequency"]) and quota["heavy"] > 0)}
    writes = [(relative[sink], torch.nonzero(sink)[:, 0], None)]  # (targets, tokens, sources)
    counted = list(counts)
    for ring, name in enumerate(("class", "window")):
        index = torch.nonzero(joins[name])[:, 0]
        first, counted[ring] = counted[ring], counted[ring] + len(index)
        newest = index[len(index) - min(len(index), quota[name]):]
        ring_counts = torch.arange(counted[ring] - len(newest), counted[ring], device=device)
        writes.append((base[name] + ring_counts % max(quota[name], 1), newest, None))
        if name == "window" and quota["heavy"]:  # the tokens the ring overwrites may join the hitters
            leaving_from = max(first, quota["window"])  # ring counts whose write overwrites a token
            left = torch.arange(leaving_from, max(leaving_from, counted[ring]), device=device) - quota["window"]
            held = left < first  # the ring held it before the chunk; else the chunk's own token left
            slot = base["window"] + left % quota["window"]
            token = index[(left - first).clamp(min=0)]
            entering, free = _hitters(positions, scores, base["heavy"], quota["heavy"],
                                      torch.where(held, scores[slot], own[token]), quota["heavy"])
            writes.append((free, torch.where(held, -1, token)[entering], torch.where(held, slot, -1)[entering]))
    index = torch.nonzero(joins["heavy"])[:, 0]
    if len(index):
        entering, free = _hitters(positions, scores, base["heavy"], quota["heavy"], own[index[:-1]],
                                  quota["heavy"] - 1)
        writes.append((free, torch.cat([index[:-1][entering], index[-1:]]), None))
    target = torch.cat([targets for targets, _, _ in writes])
    token = torch.cat([tokens for _, tokens, _ in writes])
    source = torch.cat([torch.full_like(tokens, -1) if sources is None else sources for _, tokens, sources in writes])
    return ChunkWrites(target, token, source, counted)


def _hitters(positions, scores, first: int, quota: int, candidates: torch.Tensor, keep: int):
    """Which candidates (in the order they came) are among the `keep` best of the heavy region's
    tokens (slots first..first + quota of the segment; empty ones score -inf) and the candidates,
    earlier ones first on ties; and the region's slots they take, ascending: those of the tokens
    that are not kept (one more than the entrants when keep = quota - 1)."""
    region = slice(first, first + quota)
    held = scores[region].masked_fill(positions[region] < 0, float("-inf"))
    order = torch.sort(torch.cat([held, candidates]), descending=True, stable=True).indices
    kept = torch.zeros(quota + len(candidates), dtype=torch.bool, device=candidates.device)
    kept[order[:keep]] = True
    return kept[quota:], first + torch.nonzero(~kept[:quota])[:, 0]
