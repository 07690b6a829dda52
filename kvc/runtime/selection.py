"""Prefill keep-sets: which prompt tokens each KV head stores, grouped as the layout packs them.

A head keeps its first `sinks` tokens, its special/punctuation tokens (the most recent ones when
more than its class slots), the recent window, and, for frequency heads, the best remaining
tokens by SnapKV observation scores (SnapKV: the top (budget - window) plus the window). This is
`keep.keep_set` within static quotas: each token is stored once, in the first group that keeps it,
and each group's tokens fill its region of the head's segment in position order.
"""

from __future__ import annotations

import torch

from kvc.policies.errors import KvcError
from kvc.runtime.layout import CLASS, GROUPS, HEAVY, NO_GROUP, SINK, WINDOW, LayerLayout


def padding_start(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """(batch,) int64 first non-padding position of each left-padded sequence.

    attention_mask: (batch, length) 0/1; or the 4-D mask transformers builds for a compileable
    cache (batch, 1, length, keys), boolean or additive, whose last row shows the padding; or a
    dict of such masks per layer type (the full-attention one is read).
    """
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    if attention_mask.dim() == 4:
        last_row = attention_mask[:, 0, -1, :length]
        attention_mask = last_row if last_row.dtype == torch.bool else last_row == 0
    mask = attention_mask.to(device=device, dtype=torch.bool)
    start = length - mask.sum(dim=1)
    expected = torch.arange(length, device=device) >= start[:, None]
    # A traced prefill (torch.compile, torch.export) cannot stop on data: its caller checks the padding.
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if not tracing and not torch.equal(mask, expected):
        raise KvcError("the compressed cache needs left-padded prompts (padding_side='left') or no padding")
    return start


def keep_groups(
    layout: LayerLayout,
    classes: torch.Tensor,
    start: torch.Tensor,
    scores: torch.Tensor | None,
) -> torch.Tensor:
    """The group each prompt token goes to in each head, NO_GROUP if the head drops it.

    classes (batch, length) uint8 token-class bits; start (batch,) first non-padding position;
    scores (batch, kv_heads, length) float32 observation scores (needed when a head has frequency).
    Returns (batch, kv_heads, length) int64.
    """
    length = classes.shape[1]
    quota = layout.quotas[None, :, None, :]  # (1, kv_heads, 1, 4)
    class_bits = layout.column("class_bits")
    frequency = layout.column("frequency").bool()
    positions = torch.arange(length, device=classes.device)
    relative = (positions[None, :] - start[:, None])[:, None, :]  # (batch, 1, length)
    valid = relative >= 0

    sink = valid & (relative < quota[..., SINK])
    member = valid & ~sink & ((classes[:, None, :] & class_bits[None, :, None]) != 0)
    members_after = member.flip(-1).cumsum(-1).flip(-1)  # class tokens at or after each position
    klass = member & (members_after <= quota[..., CLASS])
    window = valid & ~sink & ~klass & (positions >= length - quota[..., WINDOW])
    groups = torch.full(sink.shape, NO_GROUP, dtype=torch.int64, device=classes.device)
    groups = groups.masked_fill(window, WINDOW).masked_fill(klass, CLASS).masked_fill(sink, SINK)
    if scores is not None:
        rest = valid & (groups == NO_GROUP) & frequency[None, :, None]
        heavy = rest & (score_ranks(scores, rest) < quota[..., HEAVY])
        groups = groups.masked_fill(heavy, HEAVY)
    return groups


def score_ranks(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Rank of each eligible token by descending score (ties: the earlier position). (..., L) -> int64."""
    masked = scores.masked_fill(~eligible, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def slot_sources(layout: LayerLayout, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each kept token goes: the prompt position of every slot, and the ring counters.

    groups (batch, kv_heads, length) from `keep_groups` -> index (batch, kv_heads, max_capacity)
    int64, the position each slot of a head's segment takes (-1: empty), and counts (batch,
    kv_heads, 2) int32, the class and window tokens admitted (where each ring goes on).
    """
    batch, heads, length = groups.shape
    capacity = layout.max_capacity
    offsets = layout.column("offset")
    bases = torch.stack([offsets, layout.column("class_base"), layout.column("heavy_base"),
                         layout.column("window_base")], 1) - offsets[:, None]  # (kv_heads, 4) region starts
    # A token's slot: its group's base plus how many of the group come before it. Tokens kept nowhere
    # go to a spare column, cut below. All four groups in one pass (a traced prefill holds a few
    # operations, not a handful per group).
    member = groups[..., None] == torch.arange(len(GROUPS), device=groups.device)  # (batch, heads, length, 4)
    ranked = (bases[None, :, None, :] + member.cumsum(2) - 1) * member
    slot = torch.where(groups < NO_GROUP, ranked.sum(-1), capacity)
    index = torch.full((batch, heads, capacity + 1), -1, dtype=torch.int64, device=groups.device)
    positions = torch.arange(length, device=groups.device).expand_as(groups)
    index.scatter_(-1, slot, positions)
    counts = torch.stack([(groups == CLASS).sum(-1), (groups == WINDOW).sum(-1)], -1).to(torch.int32)
    return index[..., :capacity], counts
