"""The multiple-choice knapsack over KV heads: each head takes exactly one option, the options'
bytes fit the budget, and the summed recovery is as large as possible.

`greedy` climbs every head's upper concave hull in order of marginal recovery per byte (which
solves the LP relaxation exactly, so its value is an upper bound on any plan), then `stretch`
spends what is left slot by slot along the chosen options' curves. `exact` is a dynamic program
over costs that checks the greedy on small instances. Options are anything with `cost` and
`recovery` (and `next` and `unit` to stretch, see `options.Option`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import numpy as np


class BudgetTooSmall(Exception):
    """The budget is below the cheapest choice; `minimum` is what that choice costs."""

    def __init__(self, minimum: int):
        super().__init__(f"the budget is below the minimum of {minimum} bytes")
        self.minimum = minimum


@dataclass
class Selection:
    choice: list[int]  # option index per head
    steps: list[int]  # slots stretched from that option toward its `next`
    recovery: float  # summed over heads
    cost: int
    bound: float  # the LP relaxation's value: no selection within the budget recovers more


def minimum_cost(heads) -> int:
    return sum(min(option.cost for option in options) for options in heads)


def upper_hull(options) -> list[int]:
    """Indices of the options on the upper concave hull of (cost, recovery), cheapest first.

    The first is the cheapest option (the best of equally cheap ones); each next one costs
    more and recovers more, at a falling rate of recovery per byte."""
    order = sorted(range(len(options)), key=lambda i: (options[i].cost, -options[i].recovery))
    frontier: list[int] = []
    for i in order:
        if not frontier or (options[i].recovery > options[frontier[-1]].recovery
                            and options[i].cost > options[frontier[-1]].cost):
            frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2 and _on_or_below_chord(options[hull[-2]], options[hull[-1]], options[i]):
            hull.pop()
        hull.append(i)
    return hull


def _on_or_below_chord(left, middle, right) -> bool:
    rise = (middle.recovery - left.recovery) * (right.cost - left.cost)
    chord = (right.recovery - left.recovery) * (middle.cost - left.cost)
    return rise <= chord


def greedy(heads, budget: int) -> Selection:
    """Climb the hulls by falling recovery per byte while each climb fits, then stretch."""
    if minimum_cost(heads) > budget:
        raise BudgetTooSmall(minimum_cost(heads))
    hulls = [upper_hull(options) for options in heads]
    choice = [hull[0] for hull in hulls]
    spent = sum(heads[h][i].cost for h, i in enumerate(choice))
    climbs = []  # (-recovery per byte, head, position on its hull, from, to): a head's climbs stay in hull order
    for h, hull in enumerate(hulls):
        for position, (a, b) in enumerate(itertools.pairwise(hull)):
            start, end = heads[h][a], heads[h][b]
            climbs.append(((start.recovery - end.recovery) / (end.cost - start.cost), h, position, a, b))
    climbs.sort()
    base = sum(heads[h][i].recovery for h, i in enumerate(choice))
    bound = base + _fractional_climb(heads, climbs, budget - spent)
    for _, h, _, a, b in climbs:
        extra = heads[h][b].cost - heads[h][a].cost
        if choice[h] == a and spent + extra <= budget:
            choice[h], spent = b, spent + extra
    return stretch(heads, choice, budget, bound)


def _fractional_climb(heads, climbs, left: int) -> float:
    """Recovery the LP relaxation adds: whole climbs in order, then a fraction of the first that does not fit."""
    gained = 0.0
    for _, h, _, a, b in climbs:
        start, end = heads[h][a], heads[h][b]
        extra = end.cost - start.cost
        if extra > left:
            return gained + (end.recovery - start.recovery) * left / extra
        gained, left = gained + end.recovery - start.recovery, left - extra
    return gained


def stretch(heads, choice: list[int], budget: int, bound: float = math.inf) -> Selection:
    """Spend the budget left by `choice` slot by slot along the options' curves, best rate first."""
    choice = list(choice)
    steps = [0] * len(heads)
    spent = sum(heads[h][i].cost for h, i in enumerate(choice))
    queue = [(-rate, h) for h, i in enumerate(choice) if (rate := _stretch_rate(heads[h], i)) > 0]
    heapq.heapify(queue)
    while queue:
        _, h = heapq.heappop(queue)
        start = heads[h][choice[h]]
        end = heads[h][start.next]
        length = (end.cost - start.cost) // start.unit
        take = min(length - steps[h], (budget - spent) // start.unit)
        if take <= 0:
            continue
        steps[h] += take
        spent += take * start.unit
        if steps[h] == length:
            choice[h], steps[h] = start.next, 0
            if (rate := _stretch_rate(heads[h], choice[h])) > 0:
                heapq.heappush(queue, (-rate, h))
    recovery = sum(_stretched_recovery(heads[h], i, s) for h, (i, s) in enumerate(zip(choice, steps)))
    return Selection(choice, steps, recovery, spent, bound)


def _stretch_rate(options, index: int) -> float:
    start = options[index]
    if getattr(start, "next", -1) < 0:
        return 0.0
    end = options[start.next]
    assert (end.cost - start.cost) % start.unit == 0, "a curve's points must differ by whole slots"
    return (end.recovery - start.recovery) / (end.cost - start.cost)


def _stretched_recovery(options, index: int, steps: int) -> float:
    start = options[index]
    if steps == 0:
        return start.recovery
    end = options[start.next]
    return start.recovery + (end.recovery - start.recovery) * steps * start.unit / (end.cost - start.cost)


def exact(heads, budget: int, max_states: int = 50_000_000) -> Selection:
    """The optimal choice by dynamic programming over costs (in units of their common divisor)."""
    if minimum_cost(heads) > budget:
        raise BudgetTooSmall(minimum_cost(heads))
    unit = math.gcd(*(option.cost for options in heads for option in options))
    size = budget // unit + 1
    if size * len(heads) > max_states:
        raise ValueError(f"too large for the exact solver: {len(heads)} heads x {size} cost states")
    best = np.zeros(size)  # best[c]: the most recovery with cost at most c (units) over the heads so far
    picks = np.empty((len(heads), size), dtype=np.int32)
    for h, options in enumerate(heads):
        candidates = np.full((len(options), size), -np.inf)
        for i, option in enumerate(options):
            cost = option.cost // unit
            if cost < size:
                candidates[i, cost:] = best[: size - cost] + option.recovery
        picks[h] = candidates.argmax(axis=0)
        best = candidates.max(axis=0)
    choice, left = [0] * len(heads), size - 1
    for h in reversed(range(len(heads))):
        choice[h] = int(picks[h, left])
        left -= heads[h][choice[h]].cost // unit
    cost = sum(heads[h][i].cost for h, i in enumerate(choice))
    return Selection(choice, [0] * len(heads), float(best[-1]), cost, float(best[-1]))
