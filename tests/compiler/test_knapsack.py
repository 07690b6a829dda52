"""The multiple-choice knapsack: hull, greedy and stretch against brute force and the exact DP."""

import itertools
import random
from typing import NamedTuple

import pytest

from kvc.compiler import knapsack
from kvc.compiler.compile import deployment_for
from kvc.compiler.options import head_options
from kvc.compiler.strategies import kv_heads


class Item(NamedTuple):
    cost: int
    recovery: float
    unit: int = 1
    next: int = -1


def random_instance(rng: random.Random, heads: int, options: int):
    instance = [[Item(rng.randint(1, 30), round(rng.random(), 3)) for _ in range(rng.randint(1, options))]
                for _ in range(heads)]
    low = knapsack.minimum_cost(instance)
    high = sum(max(item.cost for item in items) for items in instance)
    return instance, rng.randint(low, high)


def brute_force(instance, budget) -> float:
    best = -1.0
    for choice in itertools.product(*(range(len(items)) for items in instance)):
        if sum(instance[h][i].cost for h, i in enumerate(choice)) <= budget:
            best = max(best, sum(instance[h][i].recovery for h, i in enumerate(choice)))
    return best


def discrete(options):
    """The same options without curve links: the greedy may not stretch between them."""
    return [[option._replace(next=-1) for option in choices] for choices in options]


def test_upper_hull_is_concave_and_covers_every_option():
    rng = random.Random(0)
    for _ in range(200):
        items = [Item(rng.randint(1, 50), rng.random()) for _ in range(rng.randint(1, 12))]
        hull = knapsack.upper_hull(items)
        costs = [items[i].cost for i in hull]
        values = [items[i].recovery for i in hull]
        assert costs == sorted(set(costs)) and values == sorted(set(values))
        points = list(zip(costs, values, strict=True))
        slopes = [(b - a) / (d - c) for (c, a), (d, b) in itertools.pairwise(points)]
        assert all(s > t for s, t in itertools.pairwise(slopes))
        assert items[hull[0]].cost == min(item.cost for item in items)
        for item in items:  # no option lies above the hull within its cost range
            if item.cost >= costs[-1]:
                assert item.recovery <= values[-1] + 1e-12
                continue
            k = max(j for j, c in enumerate(costs) if c <= item.cost)
            line = values[k] + (values[k + 1] - values[k]) * (item.cost - costs[k]) / (costs[k + 1] - costs[k])
            assert item.recovery <= line + 1e-12


def test_exact_matches_brute_force():
    rng = random.Random(1)
    for _ in range(300):
        instance, budget = random_instance(rng, rng.randint(1, 4), 6)
        solution = knapsack.exact(instance, budget)
        assert solution.recovery == pytest.approx(brute_force(instance, budget))
        assert solution.cost <= budget
        assert solution.recovery == pytest.approx(sum(instance[h][i].recovery for h, i in enumerate(solution.choice)))


def test_greedy_against_brute_force_on_small_random_instances():
    rng = random.Random(2)
    ratios = []
    for _ in range(300):
        instance, budget = random_instance(rng, rng.randint(2, 5), 6)
        optimum = brute_force(instance, budget)
        solution = knapsack.greedy(instance, budget)
        assert solution.cost <= budget
        assert solution.recovery <= optimum + 1e-9 <= solution.bound + 2e-9
        ratios.append(solution.recovery / optimum if optimum else 1.0)
    assert sum(ratios) / len(ratios) > 0.97
    assert sum(r == pytest.approx(1.0) for r in ratios) / len(ratios) > 0.75


@pytest.mark.parametrize("target", [0.02, 0.05, 0.1, 0.2, 0.4])
def test_greedy_near_optimal_on_profiled_heads(small_policy, target):
    deployment = deployment_for(small_policy, 256, 1, "bfloat16")
    options = [head_options(head, deployment, small_policy.profile) for head in kv_heads(small_policy)]
    budget = max(int(target * deployment.full_cache_bytes), knapsack.minimum_cost(options))
    optimum = knapsack.exact(options, budget)
    plain = knapsack.greedy(discrete(options), budget)
    stretched = knapsack.greedy(options, budget)
    assert plain.recovery <= optimum.recovery + 1e-9 <= plain.bound + 2e-9
    assert plain.recovery >= 0.98 * optimum.recovery
    assert stretched.recovery >= plain.recovery - 1e-9
    assert stretched.recovery <= stretched.bound + 1e-9 and stretched.cost <= budget


def test_stretch_spends_the_budget_along_a_curve():
    items = [Item(10, 0.5, unit=2, next=1), Item(20, 0.7, unit=2)]
    solution = knapsack.greedy([items], 16)
    assert (solution.choice, solution.steps, solution.cost) == ([0], [3], 16)
    assert solution.recovery == pytest.approx(0.5 + 0.2 * 3 / 5)
    assert solution.bound == pytest.approx(solution.recovery)


def test_budget_below_the_cheapest_choice_reports_it():
    instance = [[Item(5, 0.1), Item(9, 0.9)], [Item(7, 0.3)]]
    for solver in (knapsack.greedy, knapsack.exact):
        with pytest.raises(knapsack.BudgetTooSmall) as raised:
            solver(instance, 11)
        assert raised.value.minimum == 12
