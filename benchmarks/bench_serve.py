"""Serving through vLLM: capacity and throughput of a kvc plan against vLLM's own full cache.

Two engines run side by side in this process, with the same KV memory (--kv-cache-memory) and
model dtype: vLLM's stock CPU attention over its full paged cache, and kvc's backend with a plan
compiled from the demo's policy at --target of the full cache's bytes. Capacity is each engine's
reported maximum concurrency for requests of --max-len tokens (its blocks over the blocks such a
request takes); the target is plan >= 0.9 x (full bytes / plan bytes) x full. Throughput: in each
round both engines get the same --requests concurrent passkey prompts of different lengths
(order alternating by round) and decode --new-tokens greedily; requests/s, generated tokens/s and
passkeys answered are per round, with the plan/full ratio taken per round.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import kvc
from kvc.compiler import compile_policy
from kvc.demo import cached_policy
from kvc.eval.passkey import passkey_correct, passkey_sample
from kvc.models import load
from kvc.outputs import recorded_path
from kvc.report import human_bytes

RESULTS = Path(__file__).parent / "results"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.25, help="the plan's share of the full cache's bytes")
    parser.add_argument("--max-len", type=int, default=1040, help="longest request (plan and engines)")
    parser.add_argument("--requests", type=int, default=8, help="concurrent requests per round")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="bytes of KV cache per engine")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (the full cache's too)")
    parser.add_argument("--chunked-prefill", action="store_true",
                        help="serve the plan with vLLM's chunked prefill on (a prompt split where a step's token "
                             "budget runs out, its rest admitted through extend; kvc's default turns it off)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_serve.json")
    return parser.parse_args()


def capacity(engine, max_len: int, blocks_per_request: int) -> float:
    """vLLM's maximum concurrency for requests of max_len tokens: its blocks over a request's."""
    blocks = engine.llm_engine.vllm_config.cache_config.num_gpu_blocks
    return blocks / blocks_per_request


def run_round(engine, prompts, samples, new_tokens: int) -> dict:
    from vllm import SamplingParams

    began = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0), use_tqdm=False)
    seconds = time.perf_counter() - began
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    right = sum(passkey_correct(sample, output.outputs[0].text) for sample, output in zip(samples, outputs))
    return {"seconds": seconds, "requests_per_s": len(prompts) / seconds, "tokens_per_s": generated / seconds,
            "passkeys": right}


def main():
    args = parse_args()
    console = Console()
    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    plan = compile_policy(cached_policy(loaded, console), target=args.target, max_len=args.max_len)
    tokenizer = loaded.tokenizer
    del loaded

    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from kvc.serving.vllm import llm
    from kvc.serving.vllm.engine import served_folder

    common = {"dtype": args.dtype, "kv_cache_memory_bytes": args.kv_cache_memory, "max_model_len": args.max_len,
              "max_num_batched_tokens": args.max_len, "max_num_seqs": args.requests, "enforce_eager": True}
    full = LLM(str(served_folder(None)), enable_prefix_caching=False, **common)  # before the plan is named
    served = llm(None, plan, **common, **({"enable_chunked_prefill": True} if args.chunked_prefill else {}))
    block = full.llm_engine.vllm_config.cache_config.block_size
    capacities = {"full": capacity(full, args.max_len, -(-args.max_len // block)), "plan": capacity(served, args.max_len, 1)}
    ratio = plan.full_cache_bytes / plan.cache_bytes
    wanted = 0.9 * ratio * capacities["full"]

    lengths = [round(args.max_len * (0.15 + 0.8 * i / max(args.requests - 1, 1))) - args.new_tokens - 8
               for i in range(args.requests)]
    samples = [passkey_sample(tokenizer, n, 0.5, seed=100 + i) for i, n in enumerate(lengths)]
    prompts = [TokensPrompt(prompt_token_ids=tokenizer(s.text).input_ids) for s in samples]
    engines = {"full": full, "plan": served}
    run_round(full, prompts[:1], samples[:1], 2)  # warm both engines up
    run_round(served, prompts[:1], samples[:1], 2)
    rounds = []
    for index in range(args.rounds):
        order = ["full", "plan"] if index % 2 == 0 else ["plan", "full"]
        rounds.append({name: run_round(engines[name], prompts, samples, args.new_tokens) for name in order})
        console.print(f"round {index + 1}: " + ", ".join(
            f"{name} {rounds[-1][name]['tokens_per_s']:.1f} tokens/s" for name in ("full", "plan")))

    def median(name, key):
        return statistics.median(r[name][key] for r in rounds)

    table = Table(title=f"{args.requests} concurrent requests of {min(lengths)}-{max(lengths)} tokens, "
                        f"{args.new_tokens} new tokens each, {human_bytes(args.kv_cache_memory)} of KV cache")
    for column in ("cache", "bytes per request", "max concurrency", "requests/s", "tokens/s", "passkeys"):
        table.add_column(column)
    per_request = {"full": plan.full_cache_bytes, "plan": plan.cache_bytes}
    for name in ("full", "plan"):
        table.add_row(name, human_bytes(per_request[name]), f"{capacities[name]:.1f}",
                      f"{median(name, 'requests_per_s'):.2f}", f"{median(name, 'tokens_per_s'):.1f}",
                      f"{min(r[name]['passkeys'] for r in rounds)}/{args.requests}")
    console.print(table)
    speed = statistics.median(r["plan"]["tokens_per_s"] / r["full"]["tokens_per_s"] for r in rounds)
    met = capacities["plan"] >= wanted
    console.print(f"capacity: plan {capacities['plan']:.1f} vs 0.9 x {ratio:.2f} x full {capacities['full']:.1f} = "
                  f"{wanted:.1f}: {'met' if met else 'NOT met'}; throughput plan/full {speed:.2f}x (median of rounds)")
    record = {
        "kvc_version": kvc.__version__, "machine": platform.platform(), "cpus": torch.get_num_threads(),
        "settings": {k: recorded_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "plan": {"bytes": plan.cache_bytes, "full_bytes": plan.full_cache_bytes, "compression": plan.compression},
        "prompt_tokens": [len(p["prompt_token_ids"]) for p in prompts],
        "capacity": {**capacities, "wanted_plan": wanted, "met": met},
        "rounds": rounds, "plan_over_full_tokens_per_s": speed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.json)}")
    for engine in engines.values():
        engine.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
