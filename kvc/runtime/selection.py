"""Prefill keep-sets: which prompt tokens each KV head stores, grouped as the layout packs them.

A head keeps its first `sinks` tokens, its special/punctuation tokens (the most recent ones when
more than its class slots), the recent window, and, for frequency heads, the best remaining
tokens by SnapKV observation scores (SnapKV: the top (budget - window) plus the window). This is
`kinds.keep_set` within static quotas: each token is stored once, in the first group that keeps it.
"""

from __future__ import annotations

import torch

from kvc.policies.errors import KvcError
from kvc.runtime.layout import CLASS, HEAVY, NO_GROUP, SINK, WINDOW, LayerLayout


def padding_start(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(batch,) int64 first non-padding position of each left-padded sequence."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int64, device=device)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    start = length - mask.sum(dim=1)
    expected = torch.arange(length, device=device) >= start[:, None]
    if not torch.equal(mask, expected):
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
    positions = torch.arange(length, device=classes.device)
    relative = (positions[None, :] - start[:, None])[:, None, :]  # (batch, 1, length)
    valid = relative >= 0

    sink = valid & (relative < quota[..., SINK])
    member = valid & ~sink & ((classes[:, None, :] & layout.class_bits[None, :, None]) != 0)
    members_after = member.flip(-1).cumsum(-1).flip(-1)  # class tokens at or after each position
    klass = member & (members_after <= quota[..., CLASS])
    window = valid & ~sink & ~klass & (positions >= length - quota[..., WINDOW])
    groups = torch.full(sink.shape, NO_GROUP, dtype=torch.int64, device=classes.device)
    groups = groups.masked_fill(window, WINDOW).masked_fill(klass, CLASS).masked_fill(sink, SINK)
    if scores is not None:
        rest = valid & (groups == NO_GROUP) & layout.frequency[None, :, None]
        heavy = rest & (score_ranks(scores, rest) < quota[..., HEAVY])
        groups = groups.masked_fill(heavy, HEAVY)
    return groups


def score_ranks(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Rank of each eligible token by descending score (ties: the earlier position). (..., L) -> int64."""
    masked = scores.masked_fill(~eligible, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def packed_indices(groups: torch.Tensor, max_capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions in slot order (grouped, then by position) and the group counts.

    groups (batch, kv_heads, length) -> indices (batch, kv_heads, min(length, max_capacity)) int64
    whose first counts.sum(-1) entries are the kept positions, and counts (batch, kv_heads, 4) int64.
    """
    length = groups.shape[-1]
    positions = torch.arange(length, device=groups.device)
    order = torch.argsort(groups * length + positions, dim=-1)
    counts = torch.stack([(groups == g).sum(-1) for g in (SINK, CLASS, HEAVY, WINDOW)], dim=-1)
    return order[..., :min(length, max_capacity)], counts
