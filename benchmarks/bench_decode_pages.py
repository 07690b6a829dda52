"""Decode steps on kvc's vLLM pages, without vLLM: the ways the backend can run them, from the same
pages. `whole`: the requests' pages gathered into a batch and written back whole (the backend's
batches before stop 63); `slots`: gathered, and only the slots the step wrote written back (its
batches of two or more since stop 63); `views`, a lone request only: the block's own pages, no
copies (its lone requests since stop 62). The 30 layers of the demo's plan (8-bit rows), each
request's prompt prefilled into its own block of eight; every way takes the same step from the same
pages, interleaved step by step, and their outputs and pages are compared bit for bit. Prints a
table and writes JSON.

    .venv/bin/python benchmarks/bench_decode_pages.py [--requests 1] [--tokens 1000] [--target 0.25] [--steps 20] [--rounds 3]
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
from kvc.runtime.store import LayerStore
from kvc.serving.vllm.pages import PageViews, layer_offsets, page_bytes

RESULTS = Path(__file__).parent / "results"
BLOCKS = 8


def prefilled_pages(plan, tokens: int, blocks: list[int], generator):
    """Every layer's pages of BLOCKS blocks, a random prompt prefilled into each of `blocks`."""
    offsets = layer_offsets(plan)
    raw = torch.zeros(BLOCKS, offsets[-1] + page_bytes(plan, plan.num_layers - 1), dtype=torch.uint8)
    views, stores = [], []
    for layer in range(plan.num_layers):
        pages = PageViews(plan, layer, raw[:, offsets[layer]:offsets[layer] + page_bytes(plan, layer)])
        store = LayerStore(plan, layer)
        for block in blocks:
            store.attach(pages.block(block))
            keys, values = (torch.randn(1, plan.num_kv_heads, tokens, plan.head_dim, generator=generator)
                            for _ in range(2))
            window = torch.randn(1, plan.num_attention_heads, 32, plan.head_dim, generator=generator)
            store.prefill(keys, values, torch.zeros(1, tokens, dtype=torch.uint8), torch.zeros(1, dtype=torch.int32),
                          window)
        views.append(pages)
        stores.append(store)
    return raw, views, stores


def decode_step(way: str, blocks: torch.Tensor, views, stores, step) -> list[torch.Tensor]:
    """One token for each request through every layer, the given way."""
    outputs = []
    classes = torch.zeros(len(blocks), 1, dtype=torch.uint8)
    for pages, store, (query, key, value) in zip(views, stores, step):
        state = pages.block(int(blocks[0])) if way == "views" else pages.gather(blocks)
        store.attach(state, prefilled=True)
        store.writes = [] if way == "slots" else None
        outputs.append(store.extend(query, key, value, classes))
        if way != "views":
            pages.scatter(blocks, state, store.take_writes() if way == "slots" else None)
    return outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default, what in (("--requests", 1, "decoding requests in the batch (at most 8)"),
                                ("--tokens", 1000, "prompt tokens"), ("--steps", 20, "decode steps per round (the "
                                "median is kept)"), ("--rounds", 3, "rounds"), ("--threads", 1, "torch threads")):
        parser.add_argument(name, type=int, default=default, help=what)
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--out", type=Path, help="JSON [default: results/decode_pages.json, _N for N requests]")
    args = parser.parse_args()
    if not 1 <= args.requests <= BLOCKS:
        parser.error(f"--requests must be 1 to {BLOCKS}")
    out = args.out or RESULTS / ("decode_pages.json" if args.requests == 1 else f"decode_pages_{args.requests}.json")
    torch.set_num_threads(args.threads)
    plan = compile_policy(embedded_policy(), args.target, max_len=args.tokens + args.rounds * args.steps + 16)
    console = Console()
    generator = torch.Generator().manual_seed(0)
    blocks = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4][:args.requests])  # out of order, as vLLM's free queue leaves them
    raw, views, stores = prefilled_pages(plan, args.tokens, blocks.tolist(), generator)
    ways = ["whole", "slots"] + (["views"] if args.requests == 1 else [])
    table = Table(title=f"{args.requests} request(s)' decode step, {args.target:.0%} plan, 8-bit rows, "
                        f"{args.tokens}-token prompts, {args.threads} thread(s)")
    for column in ("round", *(f"{way} (ms)" for way in ways), *(f"{way} / whole" for way in ways[1:]), "same"):
        table.add_column(column, justify="right")
    rows = []
    for round_ in range(args.rounds):
        times, same = {way: [] for way in ways}, True
        for index in range(args.steps):
            step = [tuple(torch.randn(args.requests, heads, 1, plan.head_dim, generator=generator)
                          for heads in (plan.num_attention_heads, plan.num_kv_heads, plan.num_kv_heads))
                    for _ in range(plan.num_layers)]
            before, results = raw.clone(), {}
            for way in ways if index % 2 else ways[::-1]:  # interleaved, each from the same pages, turn about
                raw.copy_(before)
                began = time.perf_counter()
                outputs = decode_step(way, blocks, views, stores, step)
                times[way].append(time.perf_counter() - began)
                results[way] = outputs, raw.clone()
            first = results["whole"]
            same = same and all(torch.equal(first[1], result[1]) and all(
                torch.equal(a, b) for a, b in zip(first[0], result[0])) for result in results.values())
        ms = {way: 1000 * statistics.median(times[way]) for way in ways}
        ratios = {way: ms[way] / ms["whole"] for way in ways[1:]}
        rows.append({"round": round_, **{f"{way}_ms": ms[way] for way in ways},
                     **{f"{way}_ratio": ratios[way] for way in ratios}, "same": same})
        table.add_row(str(round_), *(f"{ms[way]:.1f}" for way in ways), *(f"{ratios[way]:.3f}" for way in ratios),
                      str(same))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kvc_version": kvc.__version__, "requests": args.requests, "tokens": args.tokens,
                               "target": args.target, "threads": args.threads, "rows": rows}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(out)}")


if __name__ == "__main__":
    main()
