"""What a prefill's low-bit rows cost: the stores encode only the rows their heads keep (gathered
into the slots first), against encoding every prompt row and gathering the codes (kvc before stop
62, rebuilt here as a subclass). Random keys and values of the embedded model's shapes (3 KV heads,
head dim 64) through the 30 layers' stores of the demo's plan; both ways interleaved in one process,
round by round, their states compared bit for bit. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_prefill_rows.py [--lengths 1024,4096] [--target 0.25] [--rounds 3]
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
from kvc.runtime import quantize
from kvc.runtime.store import LayerStore

RESULTS = Path(__file__).parent / "results"


class EncodeEveryRow(LayerStore):
    """The store as it was: every prompt row turned and quantised, then the kept codes gathered."""

    def _store_slots(self, vectors, index, buffers):
        codes, params = quantize.encode(vectors, self.bits, self.rotation)
        for source, buffer in zip((codes, params.flatten(-2)), buffers):
            self.kernels.gather_slots(source, index, self.layout.segments, buffer, self.layout.table)


def prefill_all(store_class, plan, keys, values, window) -> tuple[float, list[LayerStore]]:
    length = keys.shape[2]
    classes, start = torch.zeros(1, length, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)
    began = time.perf_counter()
    stores = []
    for layer in range(plan.num_layers):
        store = store_class(plan, layer)
        store.prefill(keys, values, classes, start, window)
        stores.append(store)
    return time.perf_counter() - began, stores


def same_state(a: list[LayerStore], b: list[LayerStore]) -> bool:
    return all(torch.equal(x, y) for s, t in zip(a, b) for x, y in zip(s.held_tensors(), t.held_tensors()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="prefills per way and round (the median is kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "prefill_rows.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    policy = embedded_policy()
    table = Table(title=f"the 30 stores' prefill, {args.target:.0%} plan, 8-bit rows, {args.threads} thread(s)")
    for column in ("tokens", "round", "kept rows encoded (ms)", "every row encoded (ms)", "ratio", "same state"):
        table.add_column(column, justify="right")
    rows = []
    for length in map(int, args.lengths.split(",")):
        plan = compile_policy(policy, args.target, max_len=length)
        generator = torch.Generator().manual_seed(length)
        keys, values = (torch.randn(1, 3, length, 64, generator=generator) for _ in range(2))
        window = torch.randn(1, 9, 32, 64, generator=generator)
        for round_ in range(args.rounds):
            timings, same = {LayerStore: [], EncodeEveryRow: []}, True
            for _ in range(args.repeats):
                for store_class in timings:  # interleaved
                    seconds, stores = prefill_all(store_class, plan, keys, values, window)
                    timings[store_class].append(seconds)
                    if store_class is LayerStore:
                        kept_stores = stores
                    else:
                        same = same and same_state(kept_stores, stores)
            kept, every = (1000 * statistics.median(timings[c]) for c in (LayerStore, EncodeEveryRow))
            rows.append({"tokens": length, "round": round_, "kept_rows_ms": kept, "every_row_ms": every,
                         "ratio": kept / every, "same_state": same})
            table.add_row(str(length), str(round_), f"{kept:.1f}", f"{every:.1f}", f"{kept / every:.2f}", str(same))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kvc_version": kvc.__version__, "target": args.target, "threads": args.threads,
                                    "kv_bits": 8, "rows": rows}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.out)}")


if __name__ == "__main__":
    main()
