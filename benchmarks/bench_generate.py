"""Decode speed and memory: the compressed step against transformers' DynamicCache and StaticCache.

For each prompt length the prompt is prefilled once (through a kvc plan, recording every layer's
keys, values and observation-window queries); every cache is then built from that record, so each
configuration decodes from the same state. Rounds interleave the configurations (their order
rotates) and restore each cache before decoding --new-tokens greedily, timing wall seconds and
process CPU seconds (one thread by default: steadier on a shared machine). Ratios to DynamicCache
are taken per round, beside each round's minor page faults per token (memory the kernel maps afresh: a
step that frees and reallocates its whole cache pays for that or not as the allocator's state has it).
Also: the peak transient allocation and total allocations of one decode step (torch profiler) against
the cache's bytes, and with --compile the same step under `torch.compile(fullgraph=True)` (kvc and
StaticCache; compiling takes minutes per plan on a CPU).
The "model alone" rows decode with a cache holding only the prompt's first FLOOR_TOKENS tokens (a
DynamicCache; compiled, a StaticCache that short): the step's cost without any cache to read, the
floor no cache can go under, so DynamicCache's time over it bounds every cache's ratio.
"""

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from transformers import DynamicCache, StaticCache

import kvc
from kvc.compiler import compile_policy
from kvc.demo import cached_policy
from kvc.eval.niah import essays_text
from kvc.models import load
from kvc.outputs import recorded_path
from kvc.policies.schema import load_policy
from kvc.report import human_bytes
from kvc.runtime.apply import cache_keyword
from kvc.runtime.cache import CompressedLayer
from kvc.runtime.generate import dense_cache_bytes
from kvc.runtime.step import COMPILE_OPTIONS, Step

RESULTS = Path(__file__).parent / "results"
FLOOR_TOKENS = 8
FLOOR = "model alone"
PLANS = {"kvc 25%": {"target": 0.25}, "kvc 10%": {"target": 0.1}, "kvc 25% bf16 rows": {"target": 0.25, "kv_bits": 0},
         "kvc 25% 4-bit rows": {"target": 0.25, "kv_bits": 4}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="512,2048,4096,7680", help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while decoding")
    parser.add_argument("--prefill-threads", type=int, default=2)
    parser.add_argument("--compile", default="", help="lengths at which to also time compiled steps (e.g. 512)")
    parser.add_argument("--compile-plans", default="kvc 25%", help=f"which kvc plans to compile there, comma-separated "
                        f"(of {', '.join(PLANS)}; each compiles for minutes)")
    parser.add_argument("--policy", type=Path, default=None, help="a profiled policy (default: the demo's, cached)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_generate.json")
    return parser.parse_args()


def decode_length(prompt: int, new_tokens: int) -> int:
    """The longest sequence a case serves: the prompt, the timed tokens and a few to spare (the warm-up)."""
    return prompt + new_tokens + 8


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    ids = tokenizer(essays_text()[: tokens * 8], add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] >= tokens, "the essays are shorter than the prompt asked for"
    return ids[:, :tokens]


def record_prefill(loaded, plan, ids):
    """Prefill once through `plan`; returns (first token, per layer the arguments its store's prefill took)."""
    recorded, compress = [], CompressedLayer.compress

    def recording(layer, query, keys, values, scale):
        window = min(layer.store.plan.observation_window, query.shape[2])
        inputs = layer.cache.observed
        recorded.append((keys.clone(), values.clone(), inputs.classes, inputs.start, query[:, :, -window:].clone(), scale))
        compress(layer, query, keys, values, scale)

    CompressedLayer.compress = recording
    try:
        with kvc.apply(loaded, plan) as applied, torch.no_grad():
            cache = applied.cache()
            logits = loaded.model(ids, **{applied.cache_keyword: cache}).logits[:, -1]
    finally:
        CompressedLayer.compress = compress
    return logits.argmax(-1)[:, None], recorded


class KvcCase:
    """A plan's compressed cache, prefilled from the record; restore() puts the prefilled state back."""

    comparable = True  # decodes after the same prompt as DynamicCache

    def __init__(self, loaded, plan, record, compile=False):
        self.applied = kvc.apply(loaded, plan)
        self.cache = self.applied.cache()
        for layer, args in zip(self.cache.layers, record):
            layer.lazy_initialization(args[0])
            layer.store.prefill(*args)
        self.length = record[0][0].shape[2]
        self.cache.length = self.length
        self.saved = [t.clone() for layer in self.cache.layers for t in layer.store.held_tensors()]
        self.step = Step(loaded.model, self.cache, compile=compile)
        self.nbytes = self.cache.nbytes()

    def restore(self):
        held = [t for layer in self.cache.layers for t in layer.store.held_tensors()]
        for tensor, saved in zip(held, self.saved):
            tensor.copy_(saved)
        self.cache.length = self.length

    def __call__(self, token):
        return self.step(token)

    def close(self):
        self.applied.__exit__(None, None, None)


class HfCase:
    """DynamicCache or StaticCache holding the recorded prompt K/V; restore() rebuilds it."""

    def __init__(self, loaded, record, kind, max_len, compile=False, tokens=None):
        """tokens: keep only the record's first `tokens` positions (the floor: the model with almost no cache)."""
        if tokens is not None:
            record = [(keys[:, :, :tokens], values[:, :, :tokens]) for keys, values, *_ in record]
        self.model, self.record, self.kind, self.max_len = loaded.model, record, kind, max_len
        self.comparable = tokens is None  # the floor decodes after another prompt: its tokens are not comparable
        self.keyword = cache_keyword(loaded.model)
        self.length = record[0][0].shape[2]
        # the options kvc's compiled step uses (in-place cache writes), so StaticCache gets them too
        self.forward = torch.compile(self._forward, fullgraph=True, options=COMPILE_OPTIONS) if compile else self._forward
        self.restore()
        self.nbytes = dense_cache_bytes(self.cache)

    def restore(self):
        config = self.model.config
        self.cache = (DynamicCache(config=config) if self.kind == "dynamic"
                      else StaticCache(config=config, max_cache_len=self.max_len))
        positions = torch.arange(self.length)
        for index, (keys, values, *_) in enumerate(self.record):
            self.cache.update(keys, values, index, {"cache_position": positions})
        self.position = self.length

    def _forward(self, token, cache_position, cache):
        return self.model(input_ids=token, cache_position=cache_position, position_ids=cache_position[None],
                          use_cache=True, **{self.keyword: cache}).logits

    def __call__(self, token):
        cache_position = torch.tensor([self.position])
        with torch.no_grad():
            logits = self.forward(token, cache_position, self.cache)
        self.position += 1
        return logits


def minor_faults() -> int:
    """Page faults this process has taken so far that needed no disk (fresh or reclaimed pages)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def decode(case, first, new_tokens):
    """Greedy tokens from the restored state: (tokens, wall seconds, CPU seconds, minor page faults)."""
    case.restore()
    token, tokens = first, []
    wall, cpu, faults = time.perf_counter(), time.process_time(), minor_faults()
    for _ in range(new_tokens):
        token = case(token)[:, -1].argmax(-1)[:, None]
        tokens.append(int(token))
    return tokens, time.perf_counter() - wall, time.process_time() - cpu, minor_faults() - faults


def step_memory(case, first):
    """The largest single allocation and the sum of all allocations (bytes, each op's own) of one decode step."""
    case.restore()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        case(first)
    sizes = [event.self_cpu_memory_usage for event in profile.events() if event.self_cpu_memory_usage > 0]
    return max(sizes, default=0), sum(sizes)


def main():
    args = parse_args()
    loaded = load(args.model, dtype="float32", device="cpu")
    policy = load_policy(args.policy) if args.policy else cached_policy(loaded, Console(stderr=True))
    compiled_at = {int(length) for length in args.compile.split(",") if length}
    compiled_plans = [name.strip() for name in args.compile_plans.split(",") if name.strip()]
    unknown = [name for name in compiled_plans if name not in PLANS]
    if unknown:
        raise SystemExit(f"--compile-plans: unknown {', '.join(unknown)} (expected some of {', '.join(PLANS)})")
    results = {"model": loaded.source.name,
               "settings": {**{k: str(v) for k, v in vars(args).items()}, "json": recorded_path(args.json),
                            "policy": recorded_path(args.policy) if args.policy else "the demo's"},
               "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "python": platform.python_version(), "machine": platform.machine()},
               "lengths": {}}
    for length in (int(text) for text in args.lengths.split(",")):
        max_len = decode_length(length, args.new_tokens)
        plans = {name: compile_policy(policy, max_len=max_len, **options) for name, options in PLANS.items()}
        torch.set_num_threads(args.prefill_threads)
        began = time.perf_counter()
        first, record = record_prefill(loaded, plans["kvc 25%"], prompt_ids(loaded.tokenizer, length))
        prefill_seconds = time.perf_counter() - began
        torch.set_num_threads(args.threads)
        cases = {"DynamicCache": HfCase(loaded, record, "dynamic", max_len),
                 "StaticCache": HfCase(loaded, record, "static", max_len),
                 FLOOR: HfCase(loaded, record, "dynamic", max_len, tokens=FLOOR_TOKENS)}
        cases.update({name: KvcCase(loaded, plan, record) for name, plan in plans.items()})
        if length in compiled_at:
            cases["StaticCache compiled"] = HfCase(loaded, record, "static", max_len, compile=True)
            cases[f"{FLOOR} compiled"] = HfCase(loaded, record, "static", decode_length(FLOOR_TOKENS, args.new_tokens),
                                                compile=True, tokens=FLOOR_TOKENS)
            for name in compiled_plans:
                cases[f"{name} compiled"] = KvcCase(loaded, plans[name], record, compile=True)
        warmup = {}
        for name, case in cases.items():  # the first call compiles or warms up; not timed
            began = time.perf_counter()
            warmup[name] = decode(case, first, 2)[1]
        names, rounds = list(cases), []
        for number in range(args.rounds):
            order = names[number % len(names):] + names[:number % len(names)]
            measured = {name: decode(cases[name], first, args.new_tokens) for name in order}
            reference = measured["DynamicCache"]
            rounds.append({name: {"tokens_per_second": args.new_tokens / wall, "tokens_per_cpu_second": args.new_tokens / cpu,
                                  "cpu_ratio_to_dynamic": reference[2] / cpu, "wall_ratio_to_dynamic": reference[1] / wall,
                                  "faults_per_token": faults / args.new_tokens, "same_tokens": tokens == reference[0]}
                           for name, (tokens, wall, cpu, faults) in measured.items()})
        rows = {}
        for name, case in cases.items():
            peak, allocated = step_memory(case, first)
            per_round = [r[name] for r in rounds]
            rows[name] = {"cache_bytes": case.nbytes, "peak_step_allocation": peak, "step_allocations": allocated,
                          "first_call_seconds": warmup[name],
                          "tokens_per_cpu_second": statistics.median(r["tokens_per_cpu_second"] for r in per_round),
                          "tokens_per_second": statistics.median(r["tokens_per_second"] for r in per_round),
                          "cpu_ratio_per_round": [round(r["cpu_ratio_to_dynamic"], 3) for r in per_round],
                          "wall_ratio_per_round": [round(r["wall_ratio_to_dynamic"], 3) for r in per_round],
                          "minor_faults_per_token": [round(r["faults_per_token"]) for r in per_round],
                          "same_tokens_as_dynamic": all(r["same_tokens"] for r in per_round)
                          if case.comparable else None}
        for case in cases.values():
            if isinstance(case, KvcCase):
                case.close()
        results["lengths"][str(length)] = {"prefill_seconds": prefill_seconds, "rows": rows}
        print(f"\n{loaded.source.name}: prompt {length} tokens, {args.new_tokens} new, {args.threads} thread(s), "
              f"{args.rounds} rounds (prefill {prefill_seconds:.0f} s)")
        print(f"{'cache':<31}{'bytes':>11}{'tok/CPU s':>10}{'x Dynamic per round (CPU)':>28}{'peak step':>11}"
              f"{'allocs':>11}{'faults/token':>13}  same")
        for name, row in rows.items():
            ratios = " ".join(f"{r:.2f}" for r in row["cpu_ratio_per_round"])
            print(f"{name:<31}{human_bytes(row['cache_bytes']):>11}{row['tokens_per_cpu_second']:>10.1f}{ratios:>28}"
                  f"{human_bytes(row['peak_step_allocation']):>11}{human_bytes(row['step_allocations']):>11}"
                  f"{statistics.median(row['minor_faults_per_token']):>13.0f}  "
                  f"{ {True: 'yes', False: 'no', None: '-'}[row['same_tokens_as_dynamic']]}")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))  # after every length: a long run keeps what it measured
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
