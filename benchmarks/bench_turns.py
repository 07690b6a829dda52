"""A conversation's later turn: what feeding it into a compressed cache costs against the full cache.

A first turn of the essays (--first characters) prefills; a second turn (--second characters) is
fed as one chunk after it, through `Conversation.say` with one reply token. Cases, interleaved in
each round, one thread, CPU seconds: the full cache, the plan at --target (the demo's policy,
8-bit rows) admitting each turn's tokens all at once (the eager step's way), and the same plan
admitting them one by one (the traced step's way). Prints a table and writes JSON.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvc.compiler import compile_policy
from kvc.demo import cached_policy
from kvc.eval.niah import essays_text
from kvc.models import load
from kvc.outputs import recorded_path
from kvc.runtime.conversation import Conversation

RESULTS = Path(__file__).parent / "results"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=3000, help="characters of the essays in the first turn")
    parser.add_argument("--second", type=int, default=1200, help="characters of the essays in the second turn")
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_turns.json")
    return parser.parse_args()


def two_turns(loaded, plan, first: str, second: str, at_once: bool) -> dict:
    """CPU seconds and tokens of each turn, and what the cache holds after them."""
    with Conversation(loaded, plan) as conversation:
        for layer in conversation.cache.layers if plan is not None else []:
            layer.store.admit_chunks = at_once
        turns = []
        for text in (first, second):
            began = time.process_time()
            turn = conversation.say(text, max_new_tokens=1)
            turns.append({"tokens": turn.added_tokens, "seconds": time.process_time() - began})
        return {"turns": turns, "cached_tokens": turn.cached_tokens, "cache_bytes": turn.cache_bytes}


def main():
    args = parse_args()
    console = Console()
    torch.set_num_threads(1)
    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    plan = compile_policy(cached_policy(loaded, console), args.target, max_len=args.max_len)
    text = essays_text()
    first, second = text[:args.first], text[args.first:args.first + args.second]
    cases = {"full cache": (None, True), f"kvc {args.target:.0%}, all at once": (plan, True),
             f"kvc {args.target:.0%}, one by one": (plan, False)}
    rounds = [{name: two_turns(loaded, case_plan, first, second, at_once)
               for name, (case_plan, at_once) in cases.items()} for _ in range(args.rounds)]
    table = Table(title=f"a second turn after a first one, {args.rounds} rounds, 1 thread (CPU seconds)")
    for column in ("cache", "first turn", "second turn", "second turn per round", "× full cache (median)"):
        table.add_column(column)
    median = {name: statistics.median(r[name]["turns"][1]["seconds"] for r in rounds) for name in cases}
    for name in cases:
        turns = rounds[0][name]["turns"]
        first_seconds = statistics.median(r[name]["turns"][0]["seconds"] for r in rounds)
        table.add_row(name, f"{turns[0]['tokens']} tokens, {first_seconds:.2f} s",
                      f"{turns[1]['tokens']} tokens, {median[name]:.2f} s",
                      " ".join(f"{r[name]['turns'][1]['seconds']:.2f}" for r in rounds),
                      f"{median[name] / median['full cache']:.2f}")
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": {k: recorded_path(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                                     "rounds": rounds}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.json)}")


if __name__ == "__main__":
    main()
