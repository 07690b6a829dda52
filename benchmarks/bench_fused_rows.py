"""One layer's compiled attention over its rows: 8-bit codes against bf16 rows at the same bytes.

At the same bytes 8-bit rows hold 1.8 times the slots of bf16 ones (72 bytes per 64-channel row
against 128), so on a CPU, where the compiled step's sums are bound by arithmetic rather than by
memory, they can only be as fast if each slot costs 0.56 times as much to read. This times the
fused sums a compiled decode step runs (`_products`, softmax, `_weighted` from
`kvc.runtime.kernels.slot_attention`, under `torch.compile`) for one layer's 3 KV heads of 3 query
rows each, with the keys stored as today (slot-major: each slot's channels together) and, to
measure what a layout change would buy, channel-major (each channel's slots together, read
through a transposed view: the compiler then vectorises over slots instead of ending every slot
with a horizontal sum). Configurations are interleaved in each round; one thread.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from kvc.outputs import recorded_path
from kvc.plan import quant_group, row_bytes
from kvc.runtime.kernels.slot_attention import _products, _weighted, softmax_with_lse
from kvc.runtime.quantize import Rows
from kvc.runtime.step import COMPILE_OPTIONS

RESULTS = Path(__file__).parent / "results"
HEADS, ROWS, HEAD_DIM = 3, 3, 64  # the embedded model's KV heads per layer, GQA group, head dim
GROUPS = HEAD_DIM // quant_group(HEAD_DIM)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16-slots", type=int, default=1920, help="slots per head of the bf16 rows (25%% of 7,680)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_fused_rows.json")
    return parser.parse_args()


def rows(slots: int, bits: int, channel_major: bool):
    """Keys and values of one layer: (1, heads, slots, head_dim) as 8-bit Rows or bf16 tensors."""
    def stored(shape, make):  # slot-major, or channel-major seen as slot-major through a transposed view
        if not channel_major:
            return make(shape)
        moved = (*shape[:2], *shape[3:], shape[2])
        return make(moved).movedim(-1, 2)
    if bits:
        keys = Rows(stored((1, HEADS, slots, HEAD_DIM), lambda s: torch.randint(0, 256, s, dtype=torch.uint8)),
                    stored((1, HEADS, slots, GROUPS, 2), lambda s: torch.rand(s).half()))
        values = Rows(torch.randint(0, 256, (1, HEADS, slots, HEAD_DIM), dtype=torch.uint8),
                      torch.rand(1, HEADS, slots, GROUPS, 2).half())
        return keys, values
    keys = stored((1, HEADS, slots, HEAD_DIM), lambda s: torch.randn(s).bfloat16())
    return keys, torch.randn(1, HEADS, slots, HEAD_DIM).bfloat16()


def attend(query, keys, values, slots: int, bits: int):
    scores = _products(query, keys, slots, bits, True)
    weights, lse = softmax_with_lse(scores)
    return _weighted(weights, values, slots, bits, True), lse


def main():
    args = parse_args()
    torch.set_num_threads(1)
    same_bytes = args.bf16_slots * row_bytes(HEAD_DIM, "bfloat16")
    slots = {0: args.bf16_slots, 8: same_bytes // row_bytes(HEAD_DIM, "bfloat16", 8)}
    cases = {f"{'8-bit' if bits else 'bf16'} {'channel' if major else 'slot'}-major": (bits, major)
             for bits in (8, 0) for major in (False, True)}
    compiled = torch.compile(attend, fullgraph=True, options=COMPILE_OPTIONS)
    query = torch.randn(1, HEADS, ROWS, HEAD_DIM)
    data = {name: rows(slots[bits], bits, major) for name, (bits, major) in cases.items()}
    for name, (bits, _) in cases.items():  # compile, and check against the eager products
        output = compiled(query, *data[name], slots[bits], bits)[0]
        weights = softmax_with_lse(_products(query, data[name][0], slots[bits], bits, False))[0]
        expected = _weighted(weights, data[name][1], slots[bits], bits, False)
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)
    rounds = []
    for _ in range(args.rounds):
        measured = {}
        for name, (bits, _) in cases.items():
            began = time.perf_counter()
            for _ in range(args.calls):
                compiled(query, *data[name], slots[bits], bits)
            measured[name] = (time.perf_counter() - began) / args.calls * 1e6
        rounds.append(measured)
    reference = "bf16 slot-major"
    print(f"one layer, {HEADS} KV heads x {ROWS} query rows, the same bytes: {slots[8]} 8-bit slots or "
          f"{slots[0]} bf16 slots per head; compiled, 1 thread, {args.rounds} interleaved rounds of {args.calls} calls")
    print(f"{'rows':<24}{'slots':>7}{'us per call (rounds)':>30}{'x bf16 slot-major':>22}{'ns/slot (fastest)':>19}")
    table = {}
    for name, (bits, major) in cases.items():
        times = [r[name] for r in rounds]
        ratios = [r[name] / r[reference] for r in rounds]
        per_slot = 1e3 * min(times) / (HEADS * slots[bits])
        table[name] = {"bits": bits, "channel_major_keys": major, "slots_per_head": slots[bits],
                       "microseconds_per_call": times, "ratio_to_bf16_slot_major": ratios,
                       "nanoseconds_per_head_slot": per_slot}
        print(f"{name:<24}{slots[bits]:>7}{' '.join(f'{t:.0f}' for t in times):>30}"
              f"{' '.join(f'{r:.2f}' for r in ratios):>22}{per_slot:>19.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"torch": torch.__version__, "rounds": args.rounds, "calls": args.calls,
                                     "cases": table, "json": recorded_path(args.json)}, indent=2))
    print(f"wrote {recorded_path(args.json)}")


if __name__ == "__main__":
    main()
