"""Blockwise attention for one layer that also yields its statistics at the probe queries.

Queries run in blocks: each block's causal softmax gives the layer's output (probabilities ×
values, as eager attention computes it) and adds its column sums to running per-key totals, the
accumulated attention, which are snapshotted at every probe, and picks out the attention of
copy events on their sources (retrieval). Working memory is one block of logits plus O(n) per
head, so it grows linearly with the prompt; the statistics come from the probe rows
(kvc.profiler.recovery).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvc.profiler.measures import DEFAULT_RATIOS, LayerStatistics
from kvc.profiler.recovery import probe_statistics

# Elements of one block of attention logits (float32): bounds the working memory of a layer.
BLOCK_ELEMENTS = 1 << 22
# Query rows per block at most: short blocks skip most of the causal mask's empty upper triangle.
BLOCK_ROWS = 128


def measured_attention(query, key, value, attention_mask, scaling, probes, is_special, is_punct,
                       ratios=DEFAULT_RATIOS, copies=None) -> tuple[torch.Tensor, LayerStatistics]:
    """A layer's attention output and statistics for one prompt, on the layer's device.

    query (heads, n, d), key and value (kv_heads, n, d), post-RoPE; attention_mask: None (causal)
    or the model's mask (1, 1 | heads, n, n), boolean or additive; probes (P,) sorted positions;
    is_special, is_punct (n,) bool; copies (E, 2) copy events (query, source), None for none.
    Returns the output (n, heads, d) in the query's dtype."""
    copies = torch.zeros(0, 2, dtype=torch.long) if copies is None else copies
    output, attention, scores, copy_mass = blockwise_attention(query, key, value, attention_mask, scaling, probes, copies)
    device = attention.device
    stats = probe_statistics(attention, scores, probes.to(device) + 1, is_special.to(device), is_punct.to(device),
                             query.shape[0] // key.shape[0], ratios)
    return output, replace(stats, copy_events=len(copies), copy_mass=copy_mass.cpu())


def blockwise_attention(query, key, value, attention_mask, scaling, probes, copies):
    """Output (n, heads, d), the attention rows (heads, P, n) float32 and accumulated scores
    (heads, P, n) float64 at the probes (zero beyond each probe's prefix), and the attention of the
    copy events (E, 2) on their sources, summed: (heads,) float64."""
    heads, length, dim = query.shape
    kv_heads = key.shape[0]
    group = heads // kv_heads
    device = query.device
    probes, copies = probes.to(device), copies.to(device)
    queries = (query.float() * scaling).view(kv_heads, group, length, dim)
    keys_t = key.float().transpose(-1, -2).contiguous()  # (kv_heads, d, n)
    values = value.float()  # (kv_heads, n, d_v)
    output = torch.empty(kv_heads, group, length, value.shape[-1], device=device)
    column_sums = torch.zeros(kv_heads, group, length, dtype=torch.float64, device=device)
    attention = torch.zeros(kv_heads, group, len(probes), length, device=device)
    scores = torch.zeros(kv_heads, group, len(probes), length, dtype=torch.float64, device=device)
    copy_mass = torch.zeros(kv_heads, group, dtype=torch.float64, device=device)
    block = max(1, min(BLOCK_ROWS, BLOCK_ELEMENTS // (heads * length)))
    # One block buffer for the whole layer (a fresh large tensor per block costs page faults),
    # softmaxed in place: half the memory traffic of a separate weights tensor.
    buffer = torch.empty(heads * block * length, device=device)
    for start in range(0, length, block):
        end = min(start + block, length)
        size = heads * (end - start) * end
        rows = queries[:, :, start:end].reshape(kv_heads, -1, dim)  # (kv_heads, group·b, d): no repeated keys
        logits = _head_matmul(rows, keys_t[..., :end], buffer[:size].view(kv_heads, -1, end))
        logits = logits.view(kv_heads, group, end - start, end)
        _mask_block(logits, attention_mask, start, end)
        weights = torch.softmax(logits, dim=-1, out=logits)  # (kv_heads, group, b, end)
        output[:, :, start:end] = _head_matmul(weights.view(kv_heads, -1, end), values[:, :end]).view(
            kv_heads, group, end - start, -1)
        inside = (probes >= start) & (probes < end)
        if inside.any():
            index, rows = inside.nonzero().squeeze(-1), probes[inside] - start
            upto = (torch.arange(end - start, device=device)[None, :] <= rows[:, None]).float()  # (p, b)
            scores[..., index, :end] = column_sums[..., :end].unsqueeze(-2) + torch.matmul(upto, weights).double()
            attention[..., index, :end] = weights[..., rows, :]
        copying = copies[(copies[:, 0] >= start) & (copies[:, 0] < end)]
        if len(copying):
            copy_mass += weights[..., copying[:, 0] - start, copying[:, 1]].sum(-1).double()
        column_sums[..., :end] += torch.matmul(torch.ones(1, end - start, device=device), weights).squeeze(-2)
    output = output.view(heads, length, -1).transpose(0, 1).to(query.dtype)
    return (output, attention.view(heads, len(probes), length), scores.view(heads, len(probes), length),
            copy_mass.view(heads))


def _head_matmul(left, right, out=None) -> torch.Tensor:
    """left @ right for each KV head (dim 0). On CPU one 2-D GEMM per head runs 10-20% faster than
    the batched GEMM at these shapes (a few hundred rows by 64)."""
    if left.device.type != "cpu":
        return torch.matmul(left, right, out=out)
    if out is None:
        out = left.new_empty(left.shape[0], left.shape[1], right.shape[-1])
    for head in range(left.shape[0]):
        torch.mm(left[head], right[head], out=out[head])
    return out


def _mask_block(logits, attention_mask, start: int, end: int) -> None:
    """Mask a block of logits (kv_heads, group, b, end) in place: causal, or the model's mask."""
    if attention_mask is None:
        rows = torch.arange(start, end, device=logits.device)
        future = torch.arange(start, end, device=logits.device)[None, :] > rows[:, None]  # (b, b)
        logits[..., start:end].masked_fill_(future, float("-inf"))
        return
    rows = attention_mask[0, :, start:end, :end]  # (1 | heads, b, end)
    rows = rows.reshape(-1, logits.shape[1], *rows.shape[-2:]) if rows.shape[0] > 1 else rows.unsqueeze(0)
    if rows.dtype == torch.bool:
        logits.masked_fill_(~rows.to(logits.device), float("-inf"))
    else:
        logits.add_(rows.to(device=logits.device, dtype=logits.dtype))
