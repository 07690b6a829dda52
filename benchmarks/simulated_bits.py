"""Per-head bit widths, simulated: chosen heads' rows rounded to 4-bit levels inside a plan's 8-bit rows.

kvc's plans store every row at one width (`kvc compile --kv-bits`). Before per-head widths go into
the store, the kernels, vLLM's pages and the ONNX graphs, this measures what they would buy at equal
bytes. A 4-bit row and an 8-bit row with a step 17 times finer hold the same values (4-bit code c is
8-bit code 17c), so an 8-bit plan compiled with the slots a mixed plan would afford can run as that
mixed plan. Which heads hold 4-bit rows:

    whole        the heads kept whole (retrieval heads); the others keep 8-bit rows
    snap         the SnapKV-style heads (heavy hitters and window); whole heads keep 8-bit rows
    snap-prompt  the SnapKV-style heads' prompt rows only; tokens written after the prefill (the
                 question, the answer) stay 8-bit, as KIVI keeps its newest tokens in full precision;
                 priced as 8-bit window slots and 4-bit heavy-hitter slots

`plan` compiles the 8-bit stand-in at --compile-target, prices its slots at the mixed widths and
refuses it unless that fits --target of a bf16 cache; `eval` is `kvc eval` with the stand-in's
rounding applied and its byte check left to `plan` (its reported cache bytes are the 8-bit stand-in's):

    python benchmarks/simulated_bits.py plan POLICY --target 0.1 --compile-target 0.1392 \\
        --retrieval-threshold 0.022 --max-len 1153 --heads snap --out snap.plan
    OMP_NUM_THREADS=1 python benchmarks/simulated_bits.py eval --plan snap.plan --tasks fidelity \\
        --methods full,kvc --budgets 0.1 --lengths 1024 --samples 10 --first-sample 15 --setting query-agnostic
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvc.plan import Plan, slot_bytes
from kvc.policies.errors import KvcError
from kvc.runtime import quantize, store

HEADS = ("whole", "snap", "snap-prompt")
NOTE = "simulated_bits"  # the plan's notes key naming the heads that hold 4-bit rows
LOW, HIGH = 4, 8


def low_bit_heads(plan: Plan, layer: int, writer: str) -> torch.Tensor | None:
    """(kv_heads,) bool: the heads of `layer` whose rows `writer` ('prefill' or 'extend') rounds to 4 bits."""
    heads = plan.notes.get(NOTE)
    if heads is None:
        return None
    whole = plan.has("full")[layer].bool()
    if heads == "whole":
        return whole
    if heads == "snap" or (heads == "snap-prompt" and writer == "prefill"):
        return ~whole
    return None


def rounded_to_low_bits(x: torch.Tensor, rows: quantize.Rows, heads: torch.Tensor, matrix) -> quantize.Rows:
    """8-bit `rows` of x (batch, kv_heads, ...) with the rows of `heads` holding 4-bit values instead."""
    low = quantize.encode(x, LOW, matrix)
    codes = quantize._unpack(low.codes.float(), LOW).reshape(rows.codes.shape)
    scale = (2 ** HIGH - 1) // (2 ** LOW - 1)  # 17
    params = low.params.clone()
    params[..., 0] = (low.params[..., 0].float() / scale).to(torch.float16)
    chosen = heads.reshape(1, -1, *[1] * (x.dim() - 2))
    return quantize.Rows(torch.where(chosen, (codes * scale).to(torch.uint8), rows.codes),
                         torch.where(chosen[..., None], params, rows.params))


class Rounding:
    """Stands in for `kvc.runtime.quantize` inside the store: `encode` rounds the chosen heads' rows."""

    def __init__(self):
        self.writing = None  # (layer store, 'prefill' | 'extend') while a store writes rows

    def encode(self, x, bits, matrix=None):
        rows = quantize.encode(x, bits, matrix)
        if self.writing is None or bits != HIGH:
            return rows
        layer_store, writer = self.writing
        heads = low_bit_heads(layer_store.plan, layer_store.layer, writer)
        return rows if heads is None or not heads.any() else rounded_to_low_bits(x, rows, heads, matrix)

    def __getattr__(self, name):
        return getattr(quantize, name)


def install() -> None:
    """Route the store's row writes through `Rounding` and waive `kvc eval`'s byte check for --plan."""
    from kvc.eval import harness

    rounding = Rounding()
    store.quantize = rounding
    for writer in ("prefill", "extend"):
        original = getattr(store.LayerStore, writer)

        def writing(self, *args, _original=original, _writer=writer, **kwargs):
            previous, rounding.writing = rounding.writing, (self, _writer)
            try:
                return _original(self, *args, **kwargs)
            finally:
                rounding.writing = previous
        setattr(store.LayerStore, writer, writing)

    def stand_in(loaded, plan, max_len, budget, dtype):
        plan.check_length(max_len)
        return plan
    harness.given_plan = stand_in


def mixed_bytes(plan: Plan, heads: str) -> int:
    """What the plan would take with its chosen heads' slots in 4-bit rows (snap-prompt: all but their windows)."""
    whole, capacity = plan.has("full").bool(), plan.capacity.to(torch.int64)
    low_slots = {"whole": torch.where(whole, capacity, 0), "snap": torch.where(whole, 0, capacity),
                 "snap-prompt": torch.where(whole, 0, capacity - plan.window.to(torch.int64))}[heads]
    saved = slot_bytes(plan.head_dim, plan.target.dtype, HIGH) - slot_bytes(plan.head_dim, plan.target.dtype, LOW)
    return plan.cache_bytes - int(low_slots.sum()) * saved * plan.target.batch


def make_plan(args) -> None:
    from kvc.compiler import compile_policy
    from kvc.policies.schema import load_policy

    policy = load_policy(args.policy)
    plan = compile_policy(policy, args.compile_target, max_len=args.max_len, kv_bits=HIGH,
                          retrieval_threshold=args.retrieval_threshold, merge_similarity=args.merge_similarity)
    full = plan.full_cache_bytes  # keys and values of a cache holding every token in bf16
    needed, allowed = mixed_bytes(plan, args.heads), int(args.target * full)
    whole = int(plan.has("full").sum())
    print(f"{whole} heads whole, {int(plan.capacity[~plan.has('full')].sum())} SnapKV-style slots; "
          f"4-bit {args.heads}: {needed} bytes, {needed / full:.2%} of a bf16 cache ({allowed} allowed)")
    if needed > allowed:
        raise KvcError(f"--compile-target {args.compile_target}: the mixed plan needs {needed} bytes, more than "
                       f"--target {args.target} allows ({allowed}); lower it")
    plan.notes[NOTE] = args.heads
    plan.save(args.out)
    print(f"wrote {args.out}")


def main() -> None:
    if sys.argv[1:2] == ["eval"]:
        from kvc.cli import main as kvc_main

        install()
        sys.argv = ["kvc", *sys.argv[1:]]
        return kvc_main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True)
    plan = commands.add_parser("plan", help="compile an 8-bit stand-in for a mixed-width plan")
    plan.add_argument("policy", help="a policy file from kvc profile")
    plan.add_argument("--target", type=float, required=True, help="the mixed plan's share of a bf16 cache")
    plan.add_argument("--compile-target", type=float, required=True, help="the 8-bit stand-in's kvc compile --target")
    plan.add_argument("--heads", choices=HEADS, required=True, help="which heads hold 4-bit rows (the docstring)")
    plan.add_argument("--max-len", type=int, required=True, help="kvc compile's")
    plan.add_argument("--retrieval-threshold", type=float, help="kvc compile's; pick it so the stand-in keeps "
                      "whole the heads the mixed plan would")
    plan.add_argument("--merge-similarity", default="0.5", help="kvc compile's; 0.5 as its default at 10%% or less")
    plan.add_argument("--out", required=True, help="where to write the marked 8-bit stand-in")
    commands.add_parser("eval", help="kvc eval with the stand-in's rounding (arguments as kvc eval's)")
    try:
        make_plan(parser.parse_args())
    except KvcError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
