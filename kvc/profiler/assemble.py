"""Turn summed layer statistics into the policy's layers: means, FastGen choices, curves, funnel.

Means are over all probes of all prompts, rounded to 6 decimals. Each FastGen table and each
curve is made non-decreasing with a running maximum (exactly so in theory: every entry keeps a
superset of the previous one's keys; this only removes rounding noise), and the choice at the
threshold is read from the stored table, so anyone re-choosing from the artifact agrees.
Retrieval scores are means over copy events (None when the prompts had none). A probe curve's
`recovery` holds key shares: those scoring at least each point under the context probe.
"""

from __future__ import annotations

from kvc.policies.kinds import FASTGEN_POLICIES, kind_components
from kvc.policies.schema import Curve, HeadProfile, LayerProfile, QueryHeadProfile
from kvc.profiler.context_probe import SCORE_POINTS
from kvc.profiler.measures import (
    CURVE_KINDS,
    CURVE_POINTS,
    FUNNEL_LEVEL,
    FUNNEL_LEVELS,
    WINDOW_KINDS,
    WINDOW_POINTS,
    LayerStatistics,
)

DECIMALS = 6


def fastgen_choice(table: dict[str, float], threshold: float) -> str:
    """The cheapest FastGen policy whose recovery reaches the threshold ('full' always does)."""
    return next((policy for policy in FASTGEN_POLICIES if table[policy] >= threshold), "full")


def layer_profile(index: int, stats: LayerStatistics, threshold: float, probe_shares=None) -> LayerProfile:
    """The layer's profile; `probe_shares` (kv_heads, points), when measured, the context probe's curves."""
    probes = stats.probes
    kv_heads, heads = stats.kv_fastgen.shape[0], stats.query_fastgen.shape[0]
    group = heads // kv_heads
    funnel = (stats.funnel / probes).mean(0)  # (levels,) mean over query heads
    return LayerProfile(
        index=index,
        funnel=_mean(funnel[FUNNEL_LEVELS.index(FUNNEL_LEVEL)]),
        heads=[_head(stats, kv_head, group, threshold, None if probe_shares is None else probe_shares[kv_head])
               for kv_head in range(kv_heads)],
        # A funnel curve's `recovery` holds key fractions: the share of keys carrying each mass level (`points`).
        funnel_curve=Curve(points=list(FUNNEL_LEVELS), recovery=_running_max([_mean(x) for x in funnel])),
    )


def _head(stats: LayerStatistics, kv_head: int, group: int, threshold: float, probe_shares=None) -> HeadProfile:
    probes = stats.probes
    fastgen = _fastgen_table(stats.kv_fastgen[kv_head] / probes)
    kind = fastgen_choice(fastgen, threshold)
    members = range(kv_head * group, (kv_head + 1) * group)
    return HeadProfile(
        index=kv_head,
        kind=kind,
        components=list(kind_components(kind)),
        recovery=fastgen[kind],
        fastgen=fastgen,
        curves={
            name: Curve(points=list(CURVE_POINTS), recovery=_running_max([_mean(x) for x in row / probes]))
            for name, row in zip(CURVE_KINDS, stats.curves[kv_head])
        },
        window_curves={
            name: Curve(points=list(WINDOW_POINTS), recovery=_running_max([_mean(x) for x in row / probes]))
            for name, row in zip(WINDOW_KINDS, stats.window_curves[kv_head])
        },
        sink_mass=_mean(stats.sink_mass[list(members)].mean() / probes),
        punct_fraction=_mean(stats.punct_fraction / probes),
        special_fraction=_mean(stats.special_fraction / probes),
        retrieval=None if not stats.copy_events else max(_retrieval(stats, head) for head in members),
        probe_curve=None if probe_shares is None else Curve(points=list(SCORE_POINTS),
                                                            recovery=[_mean(x) for x in probe_shares]),
        query_heads=[_query_head(stats, head, threshold) for head in members],
    )


def _query_head(stats: LayerStatistics, head: int, threshold: float) -> QueryHeadProfile:
    """`index` is the model's query-head index (KV head × group + position in the group)."""
    fastgen = _fastgen_table(stats.query_fastgen[head] / stats.probes)
    kind = fastgen_choice(fastgen, threshold)
    return QueryHeadProfile(
        index=head, kind=kind, recovery=fastgen[kind], fastgen=fastgen,
        sink_mass=_mean(stats.sink_mass[head] / stats.probes),
        retrieval=_retrieval(stats, head),
    )


def _retrieval(stats: LayerStatistics, head: int) -> float | None:
    return _mean(stats.copy_mass[head] / stats.copy_events) if stats.copy_events else None


def _fastgen_table(row) -> dict[str, float]:
    values = _running_max([_mean(x) for x in row])
    values[-1] = 1.0  # 'full' keeps every key
    return dict(zip(FASTGEN_POLICIES, values))


def _mean(value) -> float:
    return min(1.0, max(0.0, round(float(value), DECIMALS)))


def _running_max(values: list[float]) -> list[float]:
    result, best = [], 0.0
    for value in values:
        best = max(best, value)
        result.append(best)
    return result
