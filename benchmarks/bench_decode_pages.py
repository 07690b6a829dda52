"""One request's decode step on kvc's vLLM pages, without vLLM: its page gathered into a batch of one
and written back (how the backend runs a batch of decoding requests) against the block's own views
(how it runs a lone one since stop 62). The 30 layers of the demo's plan (8-bit rows), a prompt
prefilled into one block of eight; both ways take the same step from the same pages, interleaved
step by step, and their outputs and pages are compared bit for bit. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_decode_pages.py [--tokens 1000] [--target 0.25] [--steps 20] [--rounds 3]
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
BLOCKS, BLOCK = 8, 3


def prefilled_pages(plan, tokens: int, generator) -> tuple[torch.Tensor, list[PageViews], list[LayerStore]]:
    offsets = layer_offsets(plan)
    raw = torch.zeros(BLOCKS, offsets[-1] + page_bytes(plan, plan.num_layers - 1), dtype=torch.uint8)
    views, stores = [], []
    for layer in range(plan.num_layers):
        pages = PageViews(plan, layer, raw[:, offsets[layer]:offsets[layer] + page_bytes(plan, layer)])
        store = LayerStore(plan, layer)
        store.attach(pages.block(BLOCK))
        keys, values = (torch.randn(1, plan.num_kv_heads, tokens, plan.head_dim, generator=generator) for _ in range(2))
        window = torch.randn(1, plan.num_attention_heads, 32, plan.head_dim, generator=generator)
        store.prefill(keys, values, torch.zeros(1, tokens, dtype=torch.uint8), torch.zeros(1, dtype=torch.int32), window)
        views.append(pages)
        stores.append(store)
    return raw, views, stores


def decode_step(copies: bool, views, stores, step) -> list[torch.Tensor]:
    """One token through every layer; `copies`: over a gathered copy of the block, written back after."""
    outputs, block = [], torch.tensor([BLOCK])
    for pages, store, (query, key, value) in zip(views, stores, step):
        state = pages.gather(block) if copies else pages.block(BLOCK)
        store.attach(state, prefilled=True)
        outputs.append(store.extend(query, key, value, torch.zeros(1, 1, dtype=torch.uint8)))
        if copies:
            pages.scatter(block, state)
    return outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default, what in (("--tokens", 1000, "prompt tokens"), ("--steps", 20, "decode steps per round (the "
                                "median is kept)"), ("--rounds", 3, "rounds"), ("--threads", 1, "torch threads")):
        parser.add_argument(name, type=int, default=default, help=what)
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_pages.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plan = compile_policy(embedded_policy(), args.target, max_len=args.tokens + args.rounds * args.steps + 16)
    console = Console()
    generator = torch.Generator().manual_seed(0)
    raw, views, stores = prefilled_pages(plan, args.tokens, generator)
    table = Table(title=f"one request's decode step, {args.target:.0%} plan, 8-bit rows, {args.tokens}-token prompt, "
                        f"{args.threads} thread(s)")
    for column in ("round", "gathered and written back (ms)", "on the block's pages (ms)", "ratio", "same"):
        table.add_column(column, justify="right")
    rows = []
    for round_ in range(args.rounds):
        times, same = {True: [], False: []}, True
        for _ in range(args.steps):
            step = [tuple(torch.randn(1, heads, 1, plan.head_dim, generator=generator)
                          for heads in (plan.num_attention_heads, plan.num_kv_heads, plan.num_kv_heads))
                    for _ in range(plan.num_layers)]
            before, results = raw.clone(), {}
            for copies in (True, False):  # interleaved, each from the same pages
                raw.copy_(before)
                began = time.perf_counter()
                outputs = decode_step(copies, views, stores, step)
                times[copies].append(time.perf_counter() - began)
                results[copies] = outputs, raw.clone()
            same = same and torch.equal(results[True][1], results[False][1]) and all(
                torch.equal(a, b) for a, b in zip(results[True][0], results[False][0]))
        copied, own = (1000 * statistics.median(times[way]) for way in (True, False))
        rows.append({"round": round_, "copies_ms": copied, "views_ms": own, "ratio": own / copied, "same": same})
        table.add_row(str(round_), f"{copied:.1f}", f"{own:.1f}", f"{own / copied:.3f}", str(same))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kvc_version": kvc.__version__, "tokens": args.tokens, "target": args.target,
                                    "threads": args.threads, "rows": rows}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.out)}")


if __name__ == "__main__":
    main()
