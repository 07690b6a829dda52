"""Where one compressed decode step's time goes: attention, admission, row encoding, model matmuls, the rest.

Prefills an essay prompt of --length tokens through a compiled plan (default: the demo's policy at
25%, 8-bit rows), decodes a few warm-up tokens, times --steps unprofiled steps, then profiles as
many eager steps with cProfile (one thread). Each part is the cumulative time of the functions
that do it; "model and Python" is everything else in the step (the model's own layers,
transformers' code, the hooks).
With --compile the step runs under torch.compile(fullgraph=True) and the torch profiler splits it
by operator instead: the matrix products the compiled graph hands to aten (the model's linear
layers with the rows' rotations, and slot attention's batched products, which a decode step no
longer has: it reads the rows inside fused sums), the generated fused kernels (slot attention with
its dequantising, softmax, admission, norms and the rest), and the guard and call overhead.
"""

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch
from rich.console import Console

import kvc
from kvc.compiler import compile_policy
from kvc.demo import cached_policy
from kvc.eval.niah import essays_text
from kvc.models import load
from kvc.outputs import recorded_path
from kvc.runtime.step import Step

RESULTS = Path(__file__).parent / "results"
# part -> (file suffix, function name) whose cumulative time it is
PARTS = {
    "slot attention (kernel reference)": ("kernels/slot_attention.py", "slot_attention_reference"),
    "admission and writes": ("runtime/store.py", "_admit"),
    "encoding the new rows": ("runtime/quantize.py", "encode_turned"),
    "model matmuls (nn.Linear)": ("~", "<built-in method torch._C._nn.linear>"),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=7680)
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile'd step (compiling takes minutes)")
    parser.add_argument("--json", type=Path, default=RESULTS / "profile_step.json")
    return parser.parse_args()


def eager_parts(run, steps):
    """Seconds of each part over `steps` eager steps (cProfile's cumulative times), and the profiled total."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        run()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    cumulative = {part: sum(value[3] for (file, _, name), value in stats.items() if file.endswith(suffix) and name == function)
                  for part, (suffix, function) in PARTS.items()}
    profiled = max(value[3] for value in stats.values())
    cumulative["model and Python (the rest)"] = profiled - sum(cumulative.values())
    return cumulative, profiled


# part of a compiled step -> the profiler events (by name) whose own time it is
COMPILED_PARTS = {
    "matmuls: model linears and rotations (aten::mm)": ("aten::mm", "aten::addmm"),
    "matmuls: slot attention (aten::bmm)": ("aten::bmm",),
}


def compiled_parts(run, steps):
    """Seconds of each part over `steps` compiled steps (the torch profiler's own times), and the total."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(steps):
            run()
    own = {event.key: event.self_cpu_time_total / 1e6 for event in profile.key_averages()}
    cumulative = {part: sum(own.get(name, 0.0) for name in names) for part, names in COMPILED_PARTS.items()}
    cumulative["fused generated kernels"] = sum(seconds for name, seconds in own.items() if "CompiledFxGraph" in name)
    profiled = sum(own.values())
    cumulative["guards, calls and the rest"] = profiled - sum(cumulative.values())
    return cumulative, profiled


def main():
    args = parse_args()
    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    plan = compile_policy(cached_policy(loaded, Console(stderr=True)), args.target, max_len=args.length + args.steps + 16)
    ids = loaded.tokenizer(essays_text()[: args.length * 8], add_special_tokens=False,
                           return_tensors="pt").input_ids[:, :args.length]
    torch.set_num_threads(2)
    with kvc.apply(loaded, plan) as applied:
        cache = applied.cache()
        with torch.no_grad():
            token = loaded.model(ids, **{applied.cache_keyword: cache}).logits[:, -1:].argmax(-1)
        torch.set_num_threads(1)
        step = Step(loaded.model, cache, compile=args.compile)
        for _ in range(3):
            token = step(token)[:, -1:].argmax(-1)
        tokens = [token]

        def run():  # one greedy step from the last token
            tokens.append(step(tokens[-1])[:, -1:].argmax(-1))

        began = time.process_time()
        for _ in range(args.steps):  # timed without a profiler
            run()
        total = time.process_time() - began
        cumulative, profiled = (compiled_parts if args.compile else eager_parts)(run, args.steps)
    rows = {part: {"seconds_per_step": seconds / args.steps, "share": seconds / profiled} for part, seconds in cumulative.items()}
    how = "compiled, torch profiler" if args.compile else "eager, cProfile"
    print(f"one decode step at {args.length} tokens, plan at {args.target:.0%} ({plan.kv_bits}-bit rows), 1 thread: "
          f"{1000 * total / args.steps:.0f} ms of CPU per step ({1000 * profiled / args.steps:.0f} ms profiled, {how})")
    for part, row in rows.items():
        print(f"  {part:<50}{1000 * row['seconds_per_step']:>8.1f} ms {100 * row['share']:>6.1f}%")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"length": args.length, "target": args.target, "kv_bits": plan.kv_bits,
                                     "compiled": args.compile,
                                     "cpu_ms_per_step": 1000 * total / args.steps, "parts": rows,
                                     "json": recorded_path(args.json)}, indent=2))
    print(f"wrote {recorded_path(args.json)}")


if __name__ == "__main__":
    main()
