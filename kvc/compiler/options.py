"""Every way one KV head can be planned: its kind, slots, cost in bytes and profiled recovery.

Options come from the policy: each point of each recovery curve (a fraction of max_len, or an
absolute window), the FastGen table at the profiled ratios, and `full`. Consecutive points of
one curve are linked by `next`: a head may stretch from one to the next slot by slot, its
recovery interpolated linearly between the two measurements.

Fraction curves are read as scale-free. An absolute window W measured on prompts of n tokens
also caught the attention spread evenly over the prompt in proportion W/n, which at max_len N
is only W/N: `window_curve` takes that difference off (the spread density is the slope of the
same kind's fraction curve between its points up to 0.5) and drops windows as long as the prompts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kvc.compiler.deployment import Deployment, HeadPlan, components_of
from kvc.policies.schema import Curve, HeadProfile, ProfileInfo


class Option(NamedTuple):
    """One choice for a head: its plan (flattened, a head has dozens of options) and what it buys."""

    kind: str
    sinks: int
    class_slots: int
    heavy: int
    window: int
    full_slots: int
    recovery: float
    cost: int  # bytes
    unit: int  # bytes of one slot of this head
    next: int = -1  # index of the option one curve point further, reachable slot by slot

    @property
    def head(self) -> HeadPlan:
        return HeadPlan(*self[:6])

    @classmethod
    def of(cls, head: HeadPlan, recovery: float, deployment: Deployment) -> Option:
        return cls(*head, recovery, deployment.cost(head), deployment.slot_bytes(head.kind))


def budget_split(kind: str, budget: int) -> tuple[int, int]:
    """(heavy, window) of a curve's budget: all to the one budgeted component, or half and half."""
    components = components_of(kind)
    if "frequency" in components and "local" in components:
        return budget // 2, budget - budget // 2
    if "frequency" in components:
        return budget, 0
    if "local" in components:
        return 0, budget
    return 0, 0


def recovery_at(curve: Curve, budget: float, scale: float) -> float:
    """A curve's recovery at `budget` slots, its points being in units of `scale` slots.

    Linear between points, from (0, 0) below the first one, flat beyond the last."""
    points = np.asarray(curve.points, dtype=float) * scale
    recovery = np.asarray(curve.recovery, dtype=float)
    if points[0] > 0:
        points, recovery = np.r_[0.0, points], np.r_[0.0, recovery]
    return float(np.interp(budget, points, recovery))


def chain_options(kind: str, budgets: list[int], recoveries: list[float], profile: HeadProfile,
                  deployment: Deployment, first: int = 0) -> list[Option]:
    """Options along one curve, each linked to the next (indices counted from `first`); budgets
    that round to the same plan keep the best recovery, and plans of max_len slots or more are
    left to `full`."""
    unit = deployment.slot_bytes(kind)
    fixed = deployment.head_plan(kind, profile)  # sinks and class slots, the same at every point
    budgeted = budget_split(kind, 2) != (0, 0)
    points: list[tuple[int, float]] = []  # (budget, recovery) of distinct plans
    for budget, recovery in zip(budgets, recoveries):
        budget = budget if budgeted else 0
        if not 0 < fixed.capacity + budget < deployment.max_len:
            continue
        if points and points[-1][0] == budget:
            points[-1] = (budget, max(points[-1][1], recovery))
        else:
            points.append((budget, recovery))
    last = len(points) - 1
    return [Option(kind, fixed.sinks, fixed.class_slots, *budget_split(kind, budget), 0, recovery,
                   (fixed.capacity + budget) * unit, unit, first + i + 1 if i < last else -1)
            for i, (budget, recovery) in enumerate(points)]


def fastgen_option(kind: str, recovery: float, profile: HeadProfile, deployment: Deployment,
                   local_ratio: float, frequency_ratio: float) -> Option:
    """A FastGen policy at its profiled ratios: heavy = r_f × max_len, window = r_l × max_len."""
    heavy = round(frequency_ratio * deployment.max_len)
    window = round(local_ratio * deployment.max_len)
    head = deployment.head_plan(kind, profile, heavy=heavy, window=window)
    if head.capacity >= deployment.max_len:
        head = deployment.full_head()
    return Option.of(head, recovery, deployment)


def prompt_length(profile: ProfileInfo) -> float:
    """Mean length of the profiled prompts (0 when the policy does not say)."""
    return sum(profile.token_counts) / len(profile.token_counts) if profile.token_counts else 0.0


def spread_density(curve: Curve | None) -> float:
    """Recovery per unit fraction of the prefix that a long window still gains: the slope of a
    fraction curve between its last two points up to 0.5, where recent attention has died out."""
    if curve is None:
        return 0.0
    points = [(x, r) for x, r in zip(curve.points, curve.recovery) if x <= 0.5]
    if len(points) < 2:
        return 0.0
    (x0, r0), (x1, r1) = points[-2:]
    return max(0.0, (r1 - r0) / (x1 - x0))


def window_curve(profile: HeadProfile, kind: str, profiled: ProfileInfo, max_len: int) -> Curve:
    """A window curve read at max_len: windows shorter than the prompts, less the spread attention
    that a window of that length no longer catches at max_len (see the module docstring)."""
    curve = profile.window_curves[kind]
    length = prompt_length(profiled)
    if not length:
        return curve
    loss_per_token = spread_density(profile.curves.get(kind)) * (1 / length - 1 / max_len)
    kept = [(w, min(1.0, max(0.0, r - loss_per_token * w))) for w, r in zip(curve.points, curve.recovery) if w < length]
    return Curve([w for w, _ in kept], [r for _, r in kept])


def head_options(profile: HeadProfile, deployment: Deployment, profiled: ProfileInfo) -> list[Option]:
    """All options of one KV head; `full` is always among them."""
    max_len = deployment.max_len
    chains = [(kind, [max(1, round(x * max_len)) for x in curve.points], curve.recovery)
              for kind, curve in profile.curves.items()]
    for kind in profile.window_curves:
        curve = window_curve(profile, kind, profiled, max_len)
        chains.append((kind, [int(min(w, max_len)) for w in curve.points], curve.recovery))
    options: list[Option] = []
    for kind, budgets, recoveries in chains:
        options += chain_options(kind, budgets, recoveries, profile, deployment, first=len(options))
    fastgen = [fastgen_option(kind, recovery, profile, deployment, profiled.local_ratio, profiled.frequency_ratio)
               for kind, recovery in profile.fastgen.items() if kind != "full"]
    options += [option for option in fastgen if option.head.capacity > 0]
    options.append(Option.of(deployment.full_head(), 1.0, deployment))
    return options


def stretched(start: Option, end: Option, steps: int) -> tuple[HeadPlan, float]:
    """The head `steps` slots from `start` toward `end` (the next point of its curve), and its
    linearly interpolated recovery; heavy and window grow in proportion."""
    a, b = start.head, end.head
    total = b.capacity - a.capacity
    assert 0 <= steps <= total and a.kind == b.kind and (a.sinks, a.class_slots) == (b.sinks, b.class_slots)
    heavy = a.heavy + round((b.heavy - a.heavy) * steps / total)
    window = a.window + steps - (heavy - a.heavy)
    head = HeadPlan(a.kind, a.sinks, a.class_slots, heavy, window, a.full_slots)
    return head, start.recovery + (end.recovery - start.recovery) * steps / total
