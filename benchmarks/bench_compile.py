"""Compile time and knapsack optimality on synthetic policies (CPU).

Times every strategy on a 32-layer and an 80-layer model with 8 KV heads at max length 32768,
then measures the greedy against the optimum: brute force on small random instances, and the
exact DP on profiled-looking heads. Prints tables and writes benchmarks/results/compile_cpu.json.

    .venv/bin/python benchmarks/bench_compile.py [--repeats 7] [--out PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from kvc.compiler import STRATEGIES, compile_policy, knapsack
from kvc.compiler.compile import deployment_for
from kvc.compiler.options import head_options
from kvc.compiler.strategies import kv_heads
from kvc.plan import Plan
from kvc.policies.schema import atomic_write_text
from kvc.policies.synthetic import synthetic_policy

MODELS = {  # name: (layers, query heads, KV heads, head dim)
    "32 layers x 8 KV heads (Llama-3-8B shape)": (32, 32, 8, 128),
    "80 layers x 8 KV heads (Llama-3-70B shape)": (80, 64, 8, 128),
}
MAX_LEN = 32768
TARGET = 0.25


def time_compiles(repeats: int) -> list[dict]:
    rows = []
    for name, (layers, heads, kv_heads_, head_dim) in MODELS.items():
        policy = synthetic_policy(layers, heads, kv_heads_, head_dim, seed=0, max_position_embeddings=MAX_LEN)
        for strategy in STRATEGIES:
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                plan = compile_policy(policy, TARGET, max_len=MAX_LEN, strategy=strategy)
                seconds.append(time.perf_counter() - started)
            with tempfile.TemporaryDirectory() as folder:
                path = plan.save(Path(folder) / "plan")
                started = time.perf_counter()
                Plan.load(path)
                load = time.perf_counter() - started
            rows.append({"model": name, "heads": layers * kv_heads_, "strategy": strategy,
                         "median_ms": 1000 * statistics.median(seconds), "min_ms": 1000 * min(seconds),
                         "load_ms": 1000 * load, "expected_recovery": float(plan.expected_recovery.mean()),
                         "budget_used": plan.cache_bytes / plan.target.budget_bytes})
    return rows


class Item(NamedTuple):
    cost: int
    recovery: float
    unit: int = 1
    next: int = -1


def brute_force(instance, budget) -> float:
    best = 0.0
    for choice in itertools.product(*(range(len(items)) for items in instance)):
        if sum(instance[h][i].cost for h, i in enumerate(choice)) <= budget:
            best = max(best, sum(instance[h][i].recovery for h, i in enumerate(choice)))
    return best


def random_instances(count: int) -> dict:
    """Greedy / brute-force optimum on random multiple-choice instances (2 to 5 heads, up to 6 options)."""
    rng = random.Random(0)
    ratios = []
    for _ in range(count):
        instance = [[Item(rng.randint(1, 30), rng.random()) for _ in range(rng.randint(1, 6))]
                    for _ in range(rng.randint(2, 5))]
        low = knapsack.minimum_cost(instance)
        budget = rng.randint(low, sum(max(i.cost for i in items) for items in instance))
        optimum = brute_force(instance, budget)
        ratios.append(knapsack.greedy(instance, budget).recovery / optimum if optimum else 1.0)
    return summarise(ratios)


def profiled_instances(seeds: int, targets=(0.02, 0.05, 0.1, 0.2, 0.4)) -> dict:
    """Greedy / exact DP on synthetic profiles (8 layers x 2 KV heads, max length 256)."""
    plain, stretched, optimum_gap = [], [], []
    for seed in range(seeds):
        policy = synthetic_policy(8, 8, 2, 16, seed=seed, max_position_embeddings=4096, vocab_size=1000)
        deployment = deployment_for(policy, 256, 1, "bfloat16")
        options = [head_options(head, deployment, policy.profile) for head in kv_heads(policy)]
        unlinked = [[option._replace(next=-1) for option in choices] for choices in options]
        for target in targets:
            budget = max(int(target * deployment.full_cache_bytes), knapsack.minimum_cost(options))
            optimum = knapsack.exact(options, budget)
            greedy = knapsack.greedy(unlinked, budget)
            plain.append(greedy.recovery / optimum.recovery)
            stretched.append(knapsack.greedy(options, budget).recovery / optimum.recovery)
            optimum_gap.append(optimum.recovery / greedy.bound)
    return {"greedy_over_optimum": summarise(plain), "greedy_and_stretch_over_optimum": summarise(stretched),
            "optimum_over_lp_bound": summarise(optimum_gap)}


def summarise(ratios: list[float]) -> dict:
    return {"instances": len(ratios), "mean": statistics.fmean(ratios), "min": min(ratios),
            "optimal_share": sum(r > 1 - 1e-9 for r in ratios) / len(ratios)}


def print_tables(timings: list[dict], random_result: dict, profiled: dict) -> None:
    print(f"compile time, target {TARGET}, max length {MAX_LEN}, bf16, batch 1")
    print(f"{'model':<44} {'strategy':<9} {'median ms':>9} {'min ms':>7} {'load ms':>7} {'recovery':>8} {'budget used':>11}")
    for row in timings:
        print(f"{row['model']:<44} {row['strategy']:<9} {row['median_ms']:>9.1f} {row['min_ms']:>7.1f} "
              f"{row['load_ms']:>7.1f} {row['expected_recovery']:>8.4f} {row['budget_used']:>11.5f}")
    print("\nknapsack optimality (ratio of summed recovery)")
    print(f"{'comparison':<58} {'n':>4} {'mean':>8} {'min':>8} {'optimal':>8}")
    rows = {"greedy / brute force, random instances": random_result,
            **{f"{k.replace('_', ' ')}, profiled heads": v for k, v in profiled.items()}}
    for name, stats in rows.items():
        print(f"{name:<58} {stats['instances']:>4} {stats['mean']:>8.5f} {stats['min']:>8.5f} {stats['optimal_share']:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile_cpu.json")
    args = parser.parse_args()
    timings = time_compiles(args.repeats)
    random_result = random_instances(500)
    profiled = profiled_instances(12)
    print_tables(timings, random_result, profiled)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "compile": timings, "optimality": {"random_brute_force": random_result, "profiled_exact": profiled},
    }, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
