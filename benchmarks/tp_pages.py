"""What tensor parallelism costs a plan's pages in vLLM. vLLM needs one KV-cache spec per layer on every
rank, while each rank's heads keep their own numbers of slots, layer by layer. kvc gives every layer
the page of the rank whose layers take the most bytes and lets each rank lay its layers out across
the whole block (`pages.block_pages`); the alternative, a page per layer sized for that layer's
largest rank, is measured beside it, and so is the plan compiled for the rank count
(`kvc compile --tensor-parallel-size N`: each rank's heads with an equal share of the budget). For
each plan and rank count: a request's bytes per rank under each, over the mean rank's own bytes of
the plan compiled over all heads at once, and the expected recovery of both plans. Prints a table
and writes JSON.

    .venv/bin/python benchmarks/tp_pages.py [--out benchmarks/results/tp_pages.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

import kvc
from kvc.compiler import compile_policy
from kvc.outputs import recorded_path
from kvc.policies.synthetic import synthetic_policy
from kvc.serving.vllm.pages import block_pages, page_bytes

RESULTS = Path(__file__).parent / "results"
TARGETS = (0.5, 0.25, 0.1)


def policies():
    """(name, policy, max length, rank counts): the demo's real profile and a Llama-3-8B-shaped synthetic one."""
    from kvc.demo import cached_policy
    from kvc.models import load

    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    yield "smollm2-135m (demo policy), 1,040 tokens", cached_policy(loaded, Console(stderr=True)), 1040, (3,)
    yield ("32 layers x 8 KV heads (synthetic), 8,192 tokens",
           synthetic_policy(32, 32, 8, 128, seed=0, max_position_embeddings=8192), 8192, (2, 4, 8))


def measure(plan, balanced, ranks: int) -> dict:
    slices = [plan.rank_slice(rank, ranks) for rank in range(ranks)]
    layers = range(plan.num_layers)
    own = [sum(page_bytes(part, layer) for layer in layers) for part in slices]
    mean = sum(own) / ranks
    block = sum(block_pages(slices))
    per_layer = sum(max(page_bytes(part, layer) for part in slices) for layer in layers)
    compiled = sum(block_pages([balanced.rank_slice(rank, ranks) for rank in range(ranks)]))
    return {"ranks": ranks, "own_bytes_per_rank": own, "block_bytes": block, "page_per_layer_bytes": per_layer,
            "compiled_for_ranks_block_bytes": compiled,
            "block_over_mean": block / mean, "page_per_layer_over_mean": per_layer / mean,
            "compiled_for_ranks_over_mean": compiled / mean,
            "expected_recovery": float(plan.expected_recovery.mean()),
            "compiled_for_ranks_expected_recovery": float(balanced.expected_recovery.mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "tp_pages.json")
    args = parser.parse_args()
    console = Console()
    table = Table(title="a request's bytes per tensor-parallel rank over the mean rank's own")
    for column in ("policy", "target", "ranks", "as served (block)", "a page per layer", "compiled for the ranks",
                   "expected recovery (all heads / per rank)"):
        table.add_column(column)
    rows = []
    for name, policy, max_len, rank_counts in policies():
        for target in TARGETS:
            plan = compile_policy(policy, target, max_len=max_len)
            for ranks in rank_counts:
                balanced = compile_policy(policy, target, max_len=max_len, tensor_parallel_size=ranks)
                row = {"policy": name, "target": target, **measure(plan, balanced, ranks)}
                rows.append(row)
                table.add_row(name, f"{target:.0%}", str(ranks), f"{row['block_over_mean']:.3f}x",
                              f"{row['page_per_layer_over_mean']:.3f}x", f"{row['compiled_for_ranks_over_mean']:.3f}x",
                              f"{row['expected_recovery']:.4f} / {row['compiled_for_ranks_expected_recovery']:.4f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kvc_version": kvc.__version__, "rows": rows}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.out)}")


if __name__ == "__main__":
    main()
