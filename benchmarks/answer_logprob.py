"""How likely each plan makes the right answer: a continuous score for tuning on few samples.

Exact-match answers of a 135M model flip on small changes (one sample's multikey answer at 1K
changes with two more slots per head), so a handful of samples cannot rank two plans. This script
scores plans by the teacher-forced log-probability of the right multikey answer (or another RULER-style
task's: `--task multivalue|vartrack|fwe`, its expected strings joined by commas) after the context
was compressed alone and the question appended (`--setting query-agnostic`, the context scored by
`--context-probe`, kvc eval's default), every plan after one shared prefill, the full cache (bf16
rows) beside them. `correct` says whether every answer token was the greedy choice. Prints a table and writes JSON.

`--task fidelity` scores open-ended answers the same way (`kvc eval`'s fidelity prompts): the
target is the full cache's own 128 greedy tokens, each plan's score their mean log-probability per
token, `agreement` the share of those tokens that are also the plan's greedy choice when it is
fed the full cache's text (teacher-forced, so one early slip does not decide the rest), and `kl`
the mean KL divergence of the plan's next-token distribution from the full cache's along it.
`first_agreement` and `first_kl` are the same at the answer's first token alone, the one a free
generation most often departs at (an answer's opening word is often a near-tie).

`--methods h2o,snapkv --budget 0.1` adds `kvc eval`'s baselines at that share of a bf16 cache's
bytes (built for the plans' max length from the demo's policy), so a plan is ranked against them too.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/answer_logprob.py --samples 0-4,20-34 \\
        --plans default=a.plan,probe=b.plan [--methods h2o,snapkv --budget 0.25] [--setting query-aware] \\
        [--task fidelity|multikey|multivalue|vartrack|fwe] [--length 1024] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from rich.console import Console

from kvc.demo import cached_policy
from kvc.eval import fidelity, ruler
from kvc.eval.baselines import method_plan
from kvc.eval.questions import Prompt
from kvc.models import load
from kvc.plan import Plan
from kvc.policies.probes import DEFAULT_PROBE, PROBES
from kvc.policies.schema import atomic_write_text
from kvc.runtime.apply import apply, cache_keyword
from kvc.runtime.cache import CompressedCache
from kvc.runtime.handmade import handmade_plan
from kvc.runtime.probe import make_probe, prefill_context
from kvc.runtime.shared_prefill import SharedPrefill

ROOT = Path(__file__).resolve().parent.parent


def sample_numbers(text: str) -> list[int]:
    """'0-4,20-22' -> [0, 1, 2, 3, 4, 20, 21, 22]."""
    numbers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        numbers.extend(range(int(first), int(last or first) + 1))
    return numbers


def task_prompt(tokenizer, task: str, seed: int, length: int) -> tuple[Prompt, list[int] | None]:
    """The prompt of sample `seed` and its answer's tokens (None for fidelity: the full cache's own answer)."""
    if task == "fidelity":
        sample = fidelity.fidelity_sample(tokenizer, length, seed)
        return Prompt.encode(tokenizer, sample.context, sample.question), None
    sample = ruler.GENERATORS[task](tokenizer, length, seed=seed)
    space = "" if sample.question[-1].isspace() else " "
    answer = tokenizer(space + ", ".join(sample.answers), add_special_tokens=False).input_ids
    return Prompt.encode(tokenizer, sample.context, sample.question), answer


def follow(model, cache, keyword, logits, target: list[int] | None, reference: list[torch.Tensor] | None,
           answer_tokens: int = fidelity.ANSWER_TOKENS):
    """Feed one cache the target's tokens from `logits` (its next-token logits) on.

    target None: the cache's own greedy tokens, `answer_tokens` of them. reference None: this cache's
    log-probabilities become the reference (returned) that KL divergences are taken from.
    Returns (tokens, total log-probability, per position: whether it would pick the token greedily
    and the KL divergence, reference)."""
    tokens, length = (target or []), len(target) if target else answer_tokens
    reference = [] if reference is None else reference
    own_reference = not reference
    total, agreed, divergence = 0.0, [], []
    for index in range(length):
        logprobs = torch.log_softmax(logits.float(), -1)
        if own_reference:
            reference.append(logprobs)
        divergence.append(float((reference[index].exp() * (reference[index] - logprobs)).sum()))
        if target is None:
            tokens.append(int(logprobs.argmax()))
        token = tokens[index]
        total += float(logprobs[token])
        agreed.append(int(logprobs.argmax()) == token)
        if index + 1 < length:
            logits = model(input_ids=torch.tensor([[token]]), **{keyword: cache}, logits_to_keep=1).logits[0, -1]
    return tokens, total, agreed, divergence, reference


def answer_logprobs(loaded, plans: dict[str, Plan], task: str, seed: int, length: int, aware: bool,
                    probed: set[str], probe: str = DEFAULT_PROBE,
                    answer_tokens: int = fidelity.ANSWER_TOKENS) -> dict[str, dict]:
    """Each plan's log-probability of the target answer to sample `seed`; plans[0] is the full cache,
    whose greedy answer is the target when the task has none of its own, and whose log-probabilities
    the KL divergences are taken from. Query-agnostic, the plans named in `probed` score the
    context with `probe` (`kvc eval`'s default); the others (the baselines, as published) by its end."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt, target = task_prompt(tokenizer, task, seed, length)
    keyword, scores, reference = cache_keyword(model), {}, None
    with torch.no_grad(), apply(loaded, next(iter(plans.values()))):
        caches = [CompressedCache(plan, model, "auto", not aware and name in probed) for name, plan in plans.items()]
        if aware:
            inputs = torch.tensor([prompt.context_ids + prompt.question_ids])
            first = model(input_ids=inputs, **{keyword: SharedPrefill(caches)}, logits_to_keep=1).logits[0, -1]
        else:
            prefill_context(model, SharedPrefill(caches), prompt.context_ids,
                            make_probe(tokenizer, prompt.context_ids, probe))
        for name, cache in zip(plans, caches):
            logits = first if aware else model(input_ids=torch.tensor([prompt.question_ids]), **{keyword: cache},
                                               logits_to_keep=1).logits[0, -1]
            target, total, agreed, divergence, reference = follow(model, cache, keyword, logits, target, reference,
                                                                  answer_tokens)
            length = len(target)
            scores[name] = {"logprob": round(total / length if task == "fidelity" else total, 4),
                            "correct": all(agreed), "agreement": round(sum(agreed) / length, 4),
                            "kl": round(sum(divergence) / length, 4),
                            "first_agreement": agreed[0], "first_kl": round(divergence[0], 4)}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="the prompts' length in tokens")
    parser.add_argument("--samples", default="0-4,20-34", help="sample seeds, e.g. 0-4,20-34 (5-14 are held out)")
    parser.add_argument("--task", default="multikey", choices=("fidelity", *ruler.GENERATORS),
                        help="a RULER-style task: log p of the right answer; fidelity: mean log p per token of "
                             "the full cache's 128 greedy tokens")
    parser.add_argument("--plans", required=True, help="NAME=PLAN,... compiled for the same max length")
    parser.add_argument("--methods", default="", help="kvc eval's baselines to score beside the plans, e.g. h2o,snapkv")
    parser.add_argument("--budget", type=float, default=0.25, help="the baselines' share of a bf16 cache's bytes")
    parser.add_argument("--probe-baselines", action="store_true",
                        help="give the baselines the context probe too (kvc eval scores them as published)")
    parser.add_argument("--setting", default="query-agnostic", choices=("query-agnostic", "query-aware"))
    parser.add_argument("--context-probe", default=DEFAULT_PROBE, choices=PROBES,
                        help="what scores the plans' context query-agnostic (kvc.runtime.probe)")
    parser.add_argument("--answer-tokens", type=int, default=fidelity.ANSWER_TOKENS,
                        help="fidelity: how many of the full cache's greedy tokens to follow (1: the first token alone)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/answer_logprob.json")
    args = parser.parse_args()
    if args.answer_tokens < 1:
        parser.error("--answer-tokens: at least 1")
    loaded = load(None)
    named = dict(item.split("=", 1) for item in args.plans.split(","))
    plans = {name: Plan.load(path) for name, path in named.items()}
    max_len = min(plan.target.max_len for plan in plans.values())
    methods = [method for method in args.methods.split(",") if method]
    policy = cached_policy(loaded, Console()) if methods else None
    baselines = {f"{method} {args.budget:g}": method_plan(method, loaded, policy, max_len, args.budget, "bfloat16")
                 for method in methods}
    plans = {"full": handmade_plan(loaded.model.config, loaded.tokenizer, "full", max_len, dtype="bfloat16"),
             **plans, **baselines}
    probed = set(named) | (set(baselines) if args.probe_baselines else set())
    aware, rows = args.setting == "query-aware", []
    for seed in sample_numbers(args.samples):
        rows.append({"sample": seed, **answer_logprobs(loaded, plans, args.task, seed, args.length, aware, probed,
                                                            args.context_probe, args.answer_tokens)})
        print(seed, {name: (rows[-1][name]["logprob"], rows[-1][name]["kl"]) for name in plans}, flush=True)
    summary = {name: {"mean_logprob": round(statistics.mean(row[name]["logprob"] for row in rows), 3),
                      "correct": sum(row[name]["correct"] for row in rows) / len(rows),
                      "agreement": round(statistics.mean(row[name]["agreement"] for row in rows), 3),
                      "kl": round(statistics.mean(row[name]["kl"] for row in rows), 4),
                      "first_agreement": round(statistics.mean(row[name]["first_agreement"] for row in rows), 3),
                      "first_kl": round(statistics.mean(row[name]["first_kl"] for row in rows), 4)}
               for name in plans}
    print(f"{'plan':>18}  mean log p(answer)  correct  agreement      kl  first token: agreement      kl")
    for name, numbers in summary.items():
        print(f"{name:>18}  {numbers['mean_logprob']:18.3f}  {numbers['correct']:7.2f}  {numbers['agreement']:9.3f}"
              f"  {numbers['kl']:6.3f}  {numbers['first_agreement']:22.2f}  {numbers['first_kl']:6.3f}")
    plan_files = {name: str(Path(path).resolve().relative_to(ROOT)) if Path(path).resolve().is_relative_to(ROOT)
                  else Path(path).name for name, path in named.items()}
    plan_files.update({name: f"kvc eval's {name.split()[0]} at {args.budget:g}" for name in baselines})
    atomic_write_text(args.out, json.dumps({"task": args.task, "setting": args.setting, "length": args.length,
                                            "answer_tokens": args.answer_tokens if args.task == "fidelity" else None,
                                            "probed": sorted(probed), "context_probe": args.context_probe,
                                            "plans": plan_files, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out.resolve().relative_to(ROOT) if args.out.resolve().is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
