"""The exact eager reference for one layer: its output and statistics, by the definitions.

It materialises the whole attention matrix in float64 (O(n²) memory, short prompts only), takes
accumulated scores as its running sum over queries, and asks `keep.keep_set` for every keep-set,
probe by probe. The blockwise attention must agree with it; tests check they do.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvc.policies.keep import keep_set, special_keep
from kvc.policies.kinds import FASTGEN_POLICIES
from kvc.profiler.measures import (
    CURVE_KINDS,
    CURVE_POINTS,
    DEFAULT_RATIOS,
    FUNNEL_LEVELS,
    WINDOW_KINDS,
    WINDOW_POINTS,
    LayerStatistics,
    curve_budget,
    fastgen_budget,
    window_budget,
)


def eager_attention(query, key, attention_mask, scaling) -> torch.Tensor:
    """softmax(QKᵀ·scale + mask) in float64. query (H, n, d), key (K, n, d) -> (H, n, n)."""
    heads, length, _ = query.shape
    keys = key.double().repeat_interleave(heads // key.shape[0], 0)
    logits = torch.matmul(query.double(), keys.transpose(-1, -2)) * scaling
    if attention_mask is None:
        causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask[0, :, :length, :length], float("-inf"))
    else:
        logits = logits + attention_mask[0, :, :length, :length].double()
    return logits.softmax(-1)


def reference_attention(query, key, value, attention_mask, scaling, probes, is_special, is_punct,
                        ratios=DEFAULT_RATIOS, copies=None) -> tuple[torch.Tensor, LayerStatistics]:
    """Same inputs and results as `statistics.measured_attention`, by the definitions."""
    copies = torch.zeros(0, 2, dtype=torch.long) if copies is None else copies.cpu()
    heads, kv_heads = query.shape[0], key.shape[0]
    group = heads // kv_heads
    attention = eager_attention(query, key, attention_mask, scaling)
    values = value.double().repeat_interleave(group, 0)
    output = torch.matmul(attention, values).transpose(0, 1).to(query.dtype)  # (n, heads, d)
    stats = reference_statistics(attention.cpu(), probes, is_special.cpu(), is_punct.cpu(), kv_heads, ratios)
    copy_mass = attention.cpu()[:, copies[:, 0], copies[:, 1]].sum(-1)
    return output, replace(stats, copy_events=len(copies), copy_mass=copy_mass)


def reference_statistics(attention, probes, is_special, is_punct, kv_heads: int, ratios=DEFAULT_RATIOS) -> LayerStatistics:
    """Statistics from the whole attention matrix (heads, n, n)."""
    heads = attention.shape[0]
    group = heads // kv_heads
    accumulated = attention.cumsum(1)  # (H, n, n): row i sums the attention of queries <= i
    totals = _Totals(heads, kv_heads)
    for probe in probes.tolist():
        length = probe + 1
        own = accumulated[:, probe, :length]  # (H, n)
        probe_keys = _ProbeKeys(attention[:, probe, :length], is_special[:length], is_punct[:length])
        shared = own.view(kv_heads, group, length).sum(1).repeat_interleave(group, 0)
        budget = fastgen_budget(length, ratios)
        totals.query_fastgen += torch.stack([probe_keys.recovery(p, budget, own) for p in FASTGEN_POLICIES], -1)
        totals.kv_fastgen += torch.stack([probe_keys.recovery(p, budget, shared) for p in FASTGEN_POLICIES], -1)
        totals.curves += torch.stack([
            torch.stack([probe_keys.recovery(kind, curve_budget(kind, x, length, ratios), shared) for x in CURVE_POINTS], -1)
            for kind in CURVE_KINDS
        ], -2)
        totals.window_curves += torch.stack([
            torch.stack([probe_keys.recovery(kind, window_budget(w, length, ratios), shared) for w in WINDOW_POINTS], -1)
            for kind in WINDOW_KINDS
        ], -2)
        totals.sink_mass += probe_keys.rows[:, : ratios.sinks].sum(-1)
        totals.funnel += _funnel(probe_keys.rows)
        special = special_keep(is_special[:length], ratios.sinks)
        totals.special_fraction += float(special.double().mean())
        totals.punct_fraction += float((is_punct[:length] & ~special).double().mean())
    return totals.result(len(probes), group)


class _ProbeKeys:
    """One probe's attention rows (H, n) and its prefix's token classes (n,)."""

    def __init__(self, rows, is_special, is_punct):
        self.rows = rows
        self.classes = (is_special.expand(rows.shape[0], -1), is_punct.expand(rows.shape[0], -1))

    def recovery(self, kind, budget, scores) -> torch.Tensor:
        """Mass of keep_set(kind) per head, heavy hitters by `scores` (H, n). -> (H,)."""
        return (self.rows * keep_set(kind, *self.classes, scores, budget)).sum(-1)


def _funnel(rows) -> torch.Tensor:
    """Fewest keys (largest first) whose mass reaches each level, over the prefix. (H, n) -> (H, levels)."""
    running = rows.sort(-1, descending=True).values.cumsum(-1)
    levels = torch.tensor(FUNNEL_LEVELS, dtype=rows.dtype).view(1, -1) * running[:, -1:]
    needed = torch.searchsorted(running, levels) + 1
    return needed.clamp(max=rows.shape[-1]) / rows.shape[-1]


class _Totals:
    """Running sums over probes, per query head."""

    def __init__(self, heads: int, kv_heads: int):
        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.float64)

        self.kv_heads = kv_heads
        self.query_fastgen = zeros(heads, len(FASTGEN_POLICIES))
        self.kv_fastgen = zeros(heads, len(FASTGEN_POLICIES))
        self.curves = zeros(heads, len(CURVE_KINDS), len(CURVE_POINTS))
        self.window_curves = zeros(heads, len(WINDOW_KINDS), len(WINDOW_POINTS))
        self.sink_mass = zeros(heads)
        self.funnel = zeros(heads, len(FUNNEL_LEVELS))
        self.special_fraction = 0.0
        self.punct_fraction = 0.0

    def result(self, probes: int, group: int) -> LayerStatistics:
        def group_mean(values):
            return values.view(self.kv_heads, group, *values.shape[1:]).mean(1)

        return LayerStatistics(
            probes=probes,
            query_fastgen=self.query_fastgen,
            kv_fastgen=group_mean(self.kv_fastgen),
            curves=group_mean(self.curves),
            window_curves=group_mean(self.window_curves),
            sink_mass=self.sink_mass,
            funnel=self.funnel,
            special_fraction=self.special_fraction,
            punct_fraction=self.punct_fraction,
        )
