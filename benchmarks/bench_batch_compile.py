"""A batch of decoding requests on kvc's vLLM pages, each layer's `LayerStore.extend` eager (as the
backend runs it) against under `torch.compile` (not built into the backend: what it would buy and
cost). Without vLLM: the first --layers layers of the demo's 25% plan (8-bit rows), a 1,000-token
prompt in each of 8 blocks; every step gathers the batch's pages, extends, and writes back the
slots it wrote, as the backend does. Batch sizes in the order given (torch.compile recompiles for
the second size it sees, with the batch then dynamic, and again for a batch of one); per size the
first compiled step's seconds (the compile), then both ways interleaved step by step over rounds.
Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_batch_compile.py [--layers 3] [--batches 4,2,8,1] [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import kvc
from kvc.compiler import compile_policy
from kvc.demo import embedded_policy
from kvc.outputs import recorded_path

from bench_decode_pages import BLOCKS, prefilled_pages

RESULTS = Path(__file__).parent / "results"


def decode_step(extends, views, stores, blocks: torch.Tensor, generator) -> None:
    """One token for each of `blocks`' requests through the layers, over gathered copies of their pages."""
    plan, batch = stores[0].plan, len(blocks)
    for pages, store, extend in zip(views, stores, extends):
        state = pages.gather(blocks)
        store.attach(state, prefilled=True)
        store.writes = []
        query = torch.randn(batch, plan.num_attention_heads, 1, plan.head_dim, generator=generator)
        key, value = (torch.randn(batch, plan.num_kv_heads, 1, plan.head_dim, generator=generator) for _ in range(2))
        extend(query, key, value, torch.zeros(batch, 1, dtype=torch.uint8))
        pages.scatter(blocks, state, store.take_writes())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default, what in (("--layers", 3, "layers of the plan (each compiles on its own)"),
                                ("--tokens", 1000, "prompt tokens"), ("--steps", 5, "steps per way and round (median)"),
                                ("--rounds", 3, "rounds"), ("--threads", 1, "torch threads")):
        parser.add_argument(name, type=int, default=default, help=what)
    parser.add_argument("--batches", default="4,2,8,1", help="batch sizes, in this order")
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_compile.json",
                        help="JSON (the runs kept: batch_compile_cold.json and _warm.json, see docs/benchmarks.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(size) for size in args.batches.split(",")]
    plan = compile_policy(embedded_policy(), 0.25, max_len=args.tokens + 16 + len(batches) * args.rounds * args.steps * 3)
    generator = torch.Generator().manual_seed(0)
    _, views, stores = prefilled_pages(plan, args.tokens, list(range(BLOCKS)), generator)
    views, stores = views[:args.layers], stores[:args.layers]
    eager = [store.extend for store in stores]
    compiled = [torch.compile(store.extend, fullgraph=True) for store in stores]
    table = Table(title=f"a batch's decode step over {args.layers} layers of the 25% plan, 8-bit rows, "
                        f"{args.tokens}-token prompts, {args.threads} thread(s): ms per layer")
    for column in ("batch", "compile (s per layer)", "round", "eager", "compiled", "compiled / eager"):
        table.add_column(column, justify="right")
    rows = []
    for batch in batches:
        blocks = torch.arange(batch)
        began = time.perf_counter()
        decode_step(compiled, views, stores, blocks, generator)
        compile_s = (time.perf_counter() - began) / args.layers
        for round_ in range(args.rounds):
            times = {"eager": [], "compiled": []}
            for index in range(args.steps):
                ways = (("eager", eager), ("compiled", compiled))
                for way, extends in ways if index % 2 else ways[::-1]:
                    began = time.perf_counter()
                    decode_step(extends, views, stores, blocks, generator)
                    times[way].append((time.perf_counter() - began) / args.layers)
            ms = {way: 1000 * statistics.median(times[way]) for way in times}
            rows.append({"batch": batch, "compile_s_per_layer": compile_s, "round": round_, "eager_ms": ms["eager"],
                         "compiled_ms": ms["compiled"], "ratio": ms["compiled"] / ms["eager"]})
            table.add_row(str(batch), f"{compile_s:.1f}" if round_ == 0 else "", str(round_), f"{ms['eager']:.2f}",
                          f"{ms['compiled']:.2f}", f"{ms['compiled'] / ms['eager']:.3f}")
    console = Console()
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kvc_version": kvc.__version__, "torch": torch.__version__, "layers": args.layers,
                                    "tokens": args.tokens, "threads": args.threads, "rows": rows}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.out)}")


if __name__ == "__main__":
    main()
