"""Recovery of every keep-set at the probe queries, from their attention rows and scores.

A config is a kind with its budget at each probe: the FastGen policies but 'full', every curve
point, every window point. Its keep-set (keep_set's union) is the token classes it names, the keys
at or after its window start, and the keys scoring at least its heavy-th largest score. So each
key falls in a bin (class, window bin, score bin) whose edges are all configs' window starts and
score thresholds; a config's dropped mass is one entry of the bins' cumulative sums, and its
recovery the total less that. Scores tied at a threshold (keep_set then keeps the earliest of
them) are rare and take an exact path with one mask per config.
"""

from __future__ import annotations

import bisect
import functools
import operator
from dataclasses import dataclass

import numpy as np
import torch

from kvc.policies.kinds import FASTGEN_POLICIES, Budget, kind_components
from kvc.profiler.measures import (
    CURVE_KINDS,
    CURVE_POINTS,
    DEFAULT_RATIOS,
    FUNNEL_LEVELS,
    WINDOW_KINDS,
    WINDOW_POINTS,
    LayerStatistics,
    Ratios,
    curve_budget,
    fastgen_budget,
    window_budget,
)

CLASSES = ("other", "special", "punct")  # a key's class; 'special' includes the sinks
# Kept classes of a config's base, by index: nothing, special, special+punct.
DROPPED_CLASSES = ((0, 1, 2), (0, 2), (0,))
FASTGEN_COLUMNS = len(FASTGEN_POLICIES) - 1  # 'full' recovers everything, by definition
CURVE_COLUMNS = len(CURVE_KINDS) * len(CURVE_POINTS)
# Above this many keys, selecting order statistics row by row beats sorting rows whole (CPU).
PARTITION_LENGTH = 2048
# Elements of one chunk of probe rows (heads × probes × keys): bounds the metric stage's memory.
CHUNK_ELEMENTS = 1 << 20


def table_configs(length: int, ratios: Ratios, fastgen_only: bool = False) -> list[tuple[str, Budget]]:
    """The configs of a prefix of `length` keys, in the column order of the recovery table:
    the FastGen policies but 'full', then (unless fastgen_only) the curve and window points."""
    fastgen = [(policy, fastgen_budget(length, ratios)) for policy in FASTGEN_POLICIES[:FASTGEN_COLUMNS]]
    if fastgen_only:
        return fastgen
    return (
        fastgen
        + [(kind, curve_budget(kind, x, length, ratios)) for kind in CURVE_KINDS for x in CURVE_POINTS]
        + [(kind, window_budget(w, length, ratios)) for kind in WINDOW_KINDS for w in WINDOW_POINTS]
    )


@dataclass(frozen=True)
class KeepTable:
    """Every config's budget at each probe, and the bin edges that separate them."""

    lengths: torch.Tensor  # (P,) prefix lengths
    base: torch.Tensor  # (C,) 0 nothing, 1 special, 2 special+punct
    window: torch.Tensor  # (P, C) most recent keys kept
    heavy: torch.Tensor  # (P, C) best-scoring keys kept
    window_edges: torch.Tensor  # (P, E) sorted window starts (padded with n)
    window_bin: torch.Tensor  # (P, C) edges <= the config's window start
    heavy_edges: torch.Tensor  # (P, S) sorted positive heavy budgets (padded with the largest)
    heavy_bin: torch.Tensor  # (P, C) heavy edges <= the config's budget (0 for none)

    def to(self, device) -> KeepTable:
        return KeepTable(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))

    def select(self, probes) -> KeepTable:
        """The table of some probes only. probes: (P,) bool."""
        return KeepTable(*(
            getattr(self, name) if name == "base" else getattr(self, name)[probes] for name in self.__dataclass_fields__
        ))


def _base(kind: str) -> int:
    components = kind_components(kind)
    return 2 if "punct" in components else 1 if "special" in components else 0


@functools.lru_cache(maxsize=16)
def keep_table(lengths: tuple[int, ...], ratios: Ratios, fastgen_only: bool = False) -> KeepTable:
    """The keep table of probes with these prefix lengths (cached: a prompt's layers share it)."""
    rows = [table_configs(n, ratios, fastgen_only) for n in lengths]
    base = [_base(kind) for kind, _ in rows[0]]
    window = [[b.window if "local" in kind_components(k) else 0 for k, b in row] for row in rows]
    heavy = [[b.heavy if "frequency" in kind_components(k) else 0 for k, b in row] for row in rows]
    starts = [[n - w for w in row] for n, row in zip(lengths, window)]
    window_edges = [sorted(set(row) | {n}) for n, row in zip(lengths, starts)]
    heavy_edges = [sorted({h for h in row if h > 0}) for row in heavy]
    widest, deepest = max(map(len, window_edges)), max(map(len, heavy_edges))
    return KeepTable(
        lengths=torch.tensor(lengths),
        base=torch.tensor(base),
        window=torch.tensor(window),
        heavy=torch.tensor(heavy),
        window_edges=torch.tensor([e + [n] * (widest - len(e)) for n, e in zip(lengths, window_edges)]),
        window_bin=torch.tensor([[bisect.bisect_right(e, s) for s in row] for e, row in zip(window_edges, starts)]),
        heavy_edges=torch.tensor([e + [e[-1]] * (deepest - len(e)) for e in heavy_edges]),
        heavy_bin=torch.tensor([[bisect.bisect_right(e, h) if h else 0 for h in row] for e, row in zip(heavy_edges, heavy)]),
    )


def probe_statistics(attention, scores, lengths, is_special, is_punct, group: int, ratios=DEFAULT_RATIOS) -> LayerStatistics:
    """All statistics of a layer from its probe rows, a chunk of probes at a time.

    attention (heads, P, n) float32 and scores (heads, P, n) accumulated attention, both exactly
    zero past each prefix; lengths (P,) prefix lengths (probe + 1); is_special, is_punct (n,) bool."""
    heads, probes, length = attention.shape
    chunk = max(1, CHUNK_ELEMENTS // (heads * length))
    parts = [
        _chunk_statistics(attention[:, part], scores[:, part], lengths[part], is_special, is_punct, group, ratios)
        for part in (slice(start, start + chunk) for start in range(0, probes, chunk))
    ]
    return functools.reduce(operator.add, parts)


def _chunk_statistics(attention, scores, lengths, is_special, is_punct, group: int, ratios) -> LayerStatistics:
    heads, probes, length = attention.shape
    kv_heads = heads // group
    prefixes = tuple(lengths.tolist())
    positions = torch.arange(length, device=attention.device)
    in_prefix = positions[None, :] < lengths[:, None]  # (P, n)
    special = (is_special | (positions < ratios.sinks))[None, :] & in_prefix
    punct = is_punct[None, :] & in_prefix & ~special
    key_class = special.long() + 2 * punct.long()  # (P, n) index into CLASSES
    rows = attention.double()

    own_table = keep_table(prefixes, ratios, fastgen_only=True).to(attention.device)
    own = recoveries(rows, scores, key_class, own_table)  # (heads, P, FastGen columns)
    group_rows = rows.view(kv_heads, group, probes, length).mean(1)  # a KV head recovers its group's mean
    group_scores = scores.view(kv_heads, group, probes, length).sum(1)
    shared = recoveries(group_rows, group_scores, key_class, keep_table(prefixes, ratios).to(attention.device)).sum(1)
    windows = shared[:, FASTGEN_COLUMNS + CURVE_COLUMNS:]
    return LayerStatistics(
        probes=probes,
        query_fastgen=_with_full(own.sum(1), probes).cpu(),
        kv_fastgen=_with_full(shared[:, :FASTGEN_COLUMNS], probes).cpu(),
        curves=shared[:, FASTGEN_COLUMNS:FASTGEN_COLUMNS + CURVE_COLUMNS].reshape(kv_heads, len(CURVE_KINDS), -1).cpu(),
        window_curves=windows.reshape(kv_heads, len(WINDOW_KINDS), -1).cpu(),
        sink_mass=rows[..., : ratios.sinks].sum(-1).sum(1).cpu(),
        funnel=funnel_fractions(attention, lengths).sum(1).cpu(),
        special_fraction=float((special.sum(-1).double() / lengths).sum()),
        punct_fraction=float((punct.sum(-1).double() / lengths).sum()),
    )


def recoveries(rows, scores, key_class, table: KeepTable) -> torch.Tensor:
    """Recovery of every config per row. rows (owners, P, n) attention, float64; scores
    (owners, P, n), zero past the prefix; key_class (P, n). -> (owners, P, C) float64.

    Keys past the prefix score 0, below or level with every prefix key, so the heavy-th largest
    score over the whole row is the prefix's; keys scoring 0 have no attention at the probe (its
    own row is part of the score), so ties at 0 change no recovery."""
    length = scores.shape[-1]
    at = length - table.heavy_edges  # (P, S): ascending positions of the heavy-th largest scores
    thresholds, below = order_statistics(scores, torch.cat([at, (at - 1).clamp(min=0)], -1)).chunk(2, -1)
    inside = table.heavy_edges < table.lengths[:, None]  # the next key down is in the prefix
    tied = (below == thresholds) & (thresholds > 0) & inside  # (owners, P, S)
    recovered = _binned_recoveries(rows, scores, key_class, table, thresholds)
    tied_probes = tied.any(-1).any(0)
    if tied_probes.any():
        recovered[:, tied_probes] = _masked_recoveries(
            rows[:, tied_probes], scores[:, tied_probes], key_class[tied_probes], table.select(tied_probes))
    return recovered


def _binned_recoveries(rows, scores, key_class, table: KeepTable, thresholds) -> torch.Tensor:
    owners, probes, length = rows.shape
    edges = thresholds.shape[-1]
    window_bins, score_bins = table.window_edges.shape[-1] + 1, edges + 1
    positions = torch.arange(length, device=rows.device).expand(probes, -1).contiguous()
    window_bin = torch.searchsorted(table.window_edges, positions, right=True)  # (P, n): window edges <= position
    # score bin = thresholds above the score = edges - thresholds at or below it
    index = (key_class * window_bins + window_bin) * score_bins + edges  # (P, n)
    index = index - torch.searchsorted(thresholds.flip(-1).contiguous(), scores.contiguous(), right=True)
    mass = torch.zeros(owners, probes, len(CLASSES) * window_bins * score_bins, dtype=rows.dtype, device=rows.device)
    mass = mass.scatter_add_(-1, index, rows).view(owners, probes, len(CLASSES), window_bins, score_bins)
    # dropped[..., class, w, s]: the class's mass in window bins < w and score bins >= s
    dropped = torch.nn.functional.pad(mass.flip(-1).cumsum(-1).flip(-1).cumsum(-2), (0, 0, 1, 0))
    by_base = torch.stack([dropped[:, :, list(classes)].sum(2) for classes in DROPPED_CLASSES], 2)
    flat = (table.base[None, :] * (window_bins + 1) + table.window_bin) * score_bins + table.heavy_bin  # (P, C)
    lost = by_base.reshape(owners, probes, -1).gather(-1, flat.expand(owners, -1, -1))
    return rows.sum(-1, keepdim=True) - lost


def _masked_recoveries(rows, scores, key_class, table: KeepTable) -> torch.Tensor:
    """The exact path: one keep mask per config, heavy hitters by `top_keys`."""
    positions = torch.arange(rows.shape[-1], device=rows.device)
    kept_classes = torch.stack([torch.zeros_like(key_class, dtype=torch.bool), key_class == 1, key_class >= 1])
    columns = []
    for column, base in enumerate(table.base.tolist()):
        recent = positions[None, :] >= (table.lengths - table.window[:, column])[:, None]  # (P, n)
        keep = (kept_classes[base] | recent) | top_keys(scores, table.heavy[:, column : column + 1])[..., 0]
        columns.append((rows * keep).sum(-1))
    return torch.stack(columns, -1)


def top_keys(scores, heavy) -> torch.Tensor:
    """The heavy[p, c] best keys by score of each row, ties to the earlier position (as keep_set).
    scores (owners, P, n), zero past the prefix; heavy (P, c). -> (owners, P, n, c) bool."""
    owners, probes, length = scores.shape
    ascending = sorted_values(scores)
    at = (length - heavy).clamp(0, length - 1).expand(owners, probes, -1)  # (owners, P, c)
    threshold = torch.where(heavy > 0, ascending.gather(-1, at), torch.inf).unsqueeze(-2)  # (owners, P, 1, c)
    above = scores.unsqueeze(-1) > threshold
    tied = scores.unsqueeze(-1) == threshold
    room = heavy.view(1, probes, 1, -1) - above.sum(-2, keepdim=True)  # the earliest tied keys fill the rest
    return above | (tied & (tied.cumsum(-2) <= room))


def order_statistics(values, at) -> torch.Tensor:
    """The values at ascending sorted positions `at` of each row. values (owners, P, n), at (P, S)
    -> (owners, P, S). Long CPU rows are partitioned probe by probe, short ones sorted whole."""
    owners, probes, length = values.shape
    if values.device.type != "cpu" or length <= PARTITION_LENGTH:
        return sorted_values(values).gather(-1, at.expand(owners, -1, -1))
    array, where = values.numpy(), at.numpy()
    selected = np.empty((owners, probes, where.shape[-1]), dtype=array.dtype)
    for probe in range(probes):
        selected[:, probe] = np.partition(array[:, probe], np.unique(where[probe]), axis=-1)[:, where[probe]]
    return torch.from_numpy(selected)


def sorted_values(values) -> torch.Tensor:
    """Values sorted ascending along the last dim. On CPU numpy's sort is used: torch's CPU sort
    always builds indices as well and is an order of magnitude slower."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy(), axis=-1))
    return values.sort(dim=-1).values


def funnel_fractions(attention, lengths) -> torch.Tensor:
    """Per head and probe, the share of the prefix's keys that carries each level of the
    attention mass (the fewest keys, largest first). attention (H, P, n) -> (H, P, levels)."""
    running = sorted_values(attention).flip(-1).double().cumsum(-1)  # non-decreasing
    levels = torch.tensor(FUNNEL_LEVELS, dtype=running.dtype, device=running.device) * running[..., -1:]
    needed = torch.searchsorted(running, levels) + 1  # (H, P, levels): keys before the level, plus one
    lengths = lengths.view(1, -1, 1)
    return needed.minimum(lengths) / lengths.double()


def _with_full(table, probes: int) -> torch.Tensor:
    """Append the 'full' column: keeping every key recovers all of the mass, exactly."""
    full = torch.full((table.shape[0], 1), float(probes), dtype=table.dtype, device=table.device)
    return torch.cat([table, full], -1)
