"""What a probe after the context costs: prefill time of kvc's plan with each `--context-probe`.

On the embedded model (float32 compute, the default kvc plan at 25% of a bf16 cache), a passkey
context of each length is prefilled into the compressed cache with each probe of `PROBES`: none
(`window`), the generic probe, the reconstruction probe (read in parts of at most `PART_TOKENS`,
as the positions after the context allow), expected attention (no forward after the context) and
both; and, with `window`, the same plan merging the tokens it evicts into its heavy hitters
(`kvc-merge`, `kvc.runtime.merging`), which shows what merging costs. Configurations interleave
in every round, and each round's time is divided by the same round's `window` time. Prints a table
and writes benchmarks/results/bench_context_probe.json.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_context_probe.py [--lengths 1024,2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kvc.compiler.compile import MERGE_SIMILARITY
from kvc.eval.baselines import method_plan
from kvc.eval.passkey import passkey_sample
from kvc.eval.questions import Prompt
from kvc.models import load
from kvc.policies.schema import atomic_write_text
from kvc.runtime.apply import apply
from kvc.policies.probes import PROBES
from kvc.runtime.probe import make_probe, prefill_context

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_context_probe.json")
    args = parser.parse_args()
    from kvc.cli import default_policy

    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    policy, policy_path = default_policy(loaded)
    rows = []
    for length in [int(value) for value in args.lengths.split(",")]:
        sample = passkey_sample(loaded.tokenizer, length, 0.5, seed=0)
        prompt = Prompt.encode(loaded.tokenizer, sample.context, sample.question)
        plan = method_plan("kvc", loaded, policy, prompt.num_tokens + 16, 0.25, "bfloat16")
        plans = {False: plan, True: dataclasses.replace(plan, merge_similarity=MERGE_SIMILARITY)}
        probes = {probe: make_probe(loaded.tokenizer, prompt.context_ids, probe) for probe in PROBES}
        configurations = [(probe, False) for probe in PROBES] + [("window", True)]  # (probe, evicted tokens merged)
        seconds = {configuration: [] for configuration in configurations}
        room = loaded.model.config.max_position_embeddings - len(prompt.context_ids)
        for _ in range(args.rounds):
            for probe, merged in configurations:
                with torch.no_grad(), apply(loaded, plans[merged]) as applied:
                    cache = applied.cache()
                    began = time.perf_counter()
                    prefill_context(loaded.model, cache, prompt.context_ids, probes[probe])
                    seconds[probe, merged].append(time.perf_counter() - began)
        for probe, merged in configurations:
            ratios = [mine / base for mine, base in zip(seconds[probe, merged], seconds["window", False])]
            parts = probes[probe].parts(room) if probes[probe] else []
            rows.append({"length": len(prompt.context_ids), "probe": probe, "merged": merged,
                         "probe_forwards": len(parts),
                         "probe_tokens": sum(len(part) for part in parts),
                         "median_s": statistics.median(seconds[probe, merged]),
                         "ratios": [round(ratio, 4) for ratio in ratios], "ratio_to_window": statistics.median(ratios)})
    print(f"prefill of the context into kvc's 25% plan (embedded model, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds)")
    print(f"{'context':>8} {'probe':<20} {'evicted':<8} {'forwards':>8} {'probe tokens':>12} {'seconds':>8} "
          f"{'x window':>9}  per round")
    for row in rows:
        print(f"{row['length']:>8} {row['probe']:<20} {'merged' if row['merged'] else 'dropped':<8} "
              f"{row['probe_forwards']:>8} {row['probe_tokens']:>12} {row['median_s']:>8.2f} "
              f"{row['ratio_to_window']:>9.2f}  {', '.join(f'{ratio:.3f}' for ratio in row['ratios'])}")
    result = {"rows": rows, "rounds": args.rounds, "threads": torch.get_num_threads(), "machine": platform.platform(),
              "policy": str(Path(policy_path).name) if policy_path else None}
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
