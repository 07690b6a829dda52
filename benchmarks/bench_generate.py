"""End-to-end generation: decode speed and cache bytes, full cache against compiled plans, on the embedded model.

Rows: transformers' DynamicCache; a keep-everything plan run through the compressed runtime (its
overhead at equal memory); plans compiled by `kvc.compile_policy` at each --targets share of a full
bf16 cache, with the default 8-bit rows and with bf16 rows (`plain`), from the demo's policy (the built-in
prompts profiled once and cached; or --policy). "of full" is each cache against a full cache of the same
tokens in its own dtype (fp32 for DynamicCache, bf16 for the plans). Each row runs the same prompt
(an essay prefix of --prompt-tokens) greedily for --new-tokens; the decode speed is the
median over --repeats runs. On CPU the runtime uses its torch reference kernels.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import transformers
from rich.console import Console

from kvc.compiler import compile_policy
from kvc.demo import cached_policy
from kvc.eval.niah import essays_text
from kvc.models import load
from kvc.outputs import recorded_path
from kvc.policies.schema import load_policy
from kvc.report import human_bytes
from kvc.runtime.generate import generate
from kvc.runtime.handmade import handmade_plan

RESULTS = Path(__file__).parent / "results"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--targets", default="0.5,0.25,0.1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)")
    parser.add_argument("--policy", type=Path, default=None, help="a profiled policy (default: profile once, cache it)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_generate.json")
    return parser.parse_args()


def prompt_text(tokenizer, tokens: int) -> str:
    ids = tokenizer(essays_text()[: tokens * 8], add_special_tokens=False).input_ids[:tokens]
    return tokenizer.decode(ids)


def policy_for(loaded, path: Path | None):
    """The given policy, else the demo's: the built-in prompts, profiled once and cached."""
    return load_policy(path) if path else cached_policy(loaded, Console(stderr=True))


def measure(loaded, text, plan, args) -> dict:
    runs = [generate(loaded, text, plan, max_new_tokens=args.new_tokens) for _ in range(args.repeats)]
    first = runs[0]
    return {
        "cache_bytes": first.cache_bytes,
        "full_cache_bytes": first.full_cache_bytes,
        "prompt_tokens": first.prompt_tokens[0],
        "new_tokens": first.new_tokens,
        "decode_tokens_per_second": statistics.median(r.decode_tokens_per_second for r in runs),
        "prefill_seconds": statistics.median(r.prefill_seconds for r in runs),
        "text": first.texts[0],
    }


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(args.model, dtype="float32", device=args.device)
    text = prompt_text(loaded.tokenizer, args.prompt_tokens)
    max_len = args.prompt_tokens + args.new_tokens + 8  # room for re-tokenisation differences
    policy = policy_for(loaded, args.policy)
    plans = {"full (kvc runtime)": handmade_plan(loaded.model.config, loaded.tokenizer, "full", max_len)}
    for target in (float(t) for t in args.targets.split(",")):
        plans[f"kvc {target:.0%}"] = compile_policy(policy, target, max_len=max_len)
        plans[f"kvc-plain {target:.0%}"] = compile_policy(policy, target, max_len=max_len, kv_bits=0)
    rows = {"full (DynamicCache)": measure(loaded, text, None, args)}
    for name, plan in plans.items():
        rows[name] = {**measure(loaded, text, plan, args), "plan_bytes": plan.cache_bytes,
                      "plan_compression": plan.compression}
    reference = rows["full (DynamicCache)"]
    print(f"{loaded.source.name} on {args.device}, {args.threads} thread(s): prompt {reference['prompt_tokens']} tokens, "
          f"{args.new_tokens} new, median of {args.repeats}")
    print(f"{'cache':<22}{'bytes':>12}{'of full':>9}{'decode tok/s':>14}{'prefill s':>11}  same text")
    for name, row in rows.items():
        share = row["cache_bytes"] / row["full_cache_bytes"]
        same = "yes" if row["text"] == reference["text"] else "no"
        print(f"{name:<22}{human_bytes(row['cache_bytes']):>12}{share:>9.1%}{row['decode_tokens_per_second']:>14.1f}"
              f"{row['prefill_seconds']:>11.2f}  {same}")
    environment = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "threads": args.threads, "device": args.device}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": loaded.source.name, "environment": environment,
                                     "settings": {k: recorded_path(v) if isinstance(v, Path) else str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
