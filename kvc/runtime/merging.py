"""Evicted prompt tokens' values folded into the heavy hitter whose key is nearest (D2O's and CaM's idea).

At prefill a frequency (SnapKV-style) head keeps a few heavy hitters and its recent window and drops
the rest of the prompt. Dropped, a token's value is lost to every later query. Merged, it joins the
value of the heavy hitter whose key is most like its own (cosine similarity, after RoPE, so nearby
positions count too), when that similarity is at least the plan's `merge_similarity`: the heavy
hitter then holds the mean of its own value and those of the tokens merged into it. A query that
attends to it reads a little of its neighbours' content, in the same slot and bytes. In a prompt
compressed with its question in it only heavy hitters take merged values: the recent window may
hold the question, whose tokens must stay what they are, and sinks are a no-op by design. In a
context compressed before its questions (a prefill scored by a probe, `kvc.runtime.probe`) every
kept token but the sinks may take them, the recent window and the class tokens too: there all of
them are context. Keys, positions and scores are left as they were. Only the prefill merges: tokens
leaving later (the window's ring, a heavy hitter replaced while decoding) are dropped as before.
"""

from __future__ import annotations

import torch

from kvc.runtime.layout import HEAVY, NO_GROUP, SINK, LayerLayout

KEY_BLOCK = 1024  # prompt keys compared with the kept ones per block (bounds the similarity matrix)


def merge_evicted(layout: LayerLayout, keys: torch.Tensor, values: torch.Tensor, groups: torch.Tensor,
                  index: torch.Tensor, start: torch.Tensor, similarity: float,
                  questions_later: bool = False) -> torch.Tensor:
    """`values` with each merging slot's value the mean of itself and the evicted values merged into it.

    keys, values (batch, kv_heads, length, head_dim) after RoPE; groups (batch, kv_heads, length) from
    `keep_groups`; index (batch, kv_heads, slots) the position each slot keeps (-1: empty), from
    `slot_sources`; start (batch,) the first non-padding position. In each frequency head of the
    layer an evicted token joins the merging slot with the most similar key if that cosine
    similarity is at least `similarity`; the merging slots are the heavy hitters, or with
    `questions_later` (a context compressed before its questions) every kept token but the sinks.
    Returns a new tensor in `values`' dtype (the same values where nothing merges).
    """
    heads = layout.frequency_heads
    if not heads:
        return values
    slots = max(layout.segments[head][1] for head in heads)  # the merging heads' largest segment
    chosen = torch.tensor(heads, device=keys.device)
    merged = merge_heads(keys[:, chosen], values[:, chosen], groups[:, chosen], index[:, chosen, :slots], start,
                         similarity, questions_later)
    return values.index_copy(1, chosen, merged)


def merge_heads(keys, values, groups, index, start, similarity: float, questions_later: bool = False) -> torch.Tensor:
    """`merge_evicted` where every head merges."""
    batch, heads, length, head_dim = keys.shape
    valid = torch.arange(length, device=keys.device)[None, :] >= start[:, None]  # (batch, length)
    evicted = (groups == NO_GROUP) & valid[:, None, :]
    kept = index >= 0  # (batch, heads, slots)
    slot_index = index.clamp(min=0)
    slot_groups = groups.gather(-1, slot_index)
    target = kept & ((slot_groups != SINK) if questions_later else (slot_groups == HEAVY))
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    rows = lambda tensor: tensor.gather(2, slot_index[..., None].expand(-1, -1, -1, head_dim))  # noqa: E731
    slot_keys = rows(unit).transpose(-1, -2)
    best, nearest = nearest_slots(unit, slot_keys, target)
    joins = (evicted & (best >= similarity)).float()
    total = rows(values.float()).scatter_add(2, nearest[..., None].expand(-1, -1, -1, head_dim),
                                             values.float() * joins[..., None])
    count = torch.ones(index.shape, device=keys.device).scatter_add(2, nearest, joins)
    # Each kept position takes its slot's mean (its own value where nothing joined); empty slots write to a
    # spare position, cut after.
    spare = torch.cat([values, values[:, :, :1]], 2)
    where = torch.where(kept, index, length)[..., None].expand(-1, -1, -1, head_dim)
    return spare.scatter(2, where, (total / count[..., None]).to(values.dtype))[:, :, :length]


def nearest_slots(unit: torch.Tensor, slot_keys: torch.Tensor, target: torch.Tensor):
    """Each key's largest cosine similarity to a target slot's key (one that takes merged values), and that slot.

    unit (batch, heads, length, head_dim) unit keys; slot_keys (batch, heads, head_dim, slots);
    target (batch, heads, slots) bool. Eagerly in blocks of KEY_BLOCK keys; traced (an exported
    prefill, whose length is symbolic) in one product."""
    masked = lambda rows: (rows @ slot_keys).masked_fill(~target[:, :, None, :], float("-inf")).max(-1)  # noqa: E731
    length = unit.shape[2]
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or length <= KEY_BLOCK:
        return masked(unit)
    blocks = [masked(unit[:, :, first:first + KEY_BLOCK]) for first in range(0, length, KEY_BLOCK)]
    return torch.cat([block.values for block in blocks], 2), torch.cat([block.indices for block in blocks], 2)
