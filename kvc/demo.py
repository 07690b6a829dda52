"""The main job end to end on the embedded model: profile, compile at 25%, answer passkeys.

Profiles SmolLM2-135M-Instruct on the built-in prompt set (or reuses the policy cached for this
model and prompt set), compiles a plan that may use 25% of the full cache's bytes, and asks for a
five-digit passkey hidden at three depths in about 1,000 tokens of filler, with the full cache and
with the compressed one. Run it with `make demo` or `python -m kvc.demo`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvc import models
from kvc.compiler import compile_policy
from kvc.eval.passkey import passkey_correct, passkey_sample
from kvc.interrupts import Interrupted, signals_interrupt
from kvc.policies.errors import KvcError
from kvc.policies.schema import Policy, load_policy, save_policy
from kvc.profiler import load_prompts, profile_model
from kvc.profiler.context_probe import CONTEXT_PROBE_SCHEME
from kvc.profiler.measures import RETRIEVAL_SCHEME
from kvc.profiler.profile import progress_steps
from kvc.report import human_bytes
from kvc.runtime.generate import generate

TARGET = 0.25
PROMPT_TOKENS = 1000
NEW_TOKENS = 8
DEPTHS = (0.1, 0.5, 0.9)


def cached_policy_path(loaded) -> Path:
    """Where the policy of this model on the built-in prompts is kept in the kvc cache."""
    digest = f"{loaded.fingerprint}-{load_prompts('builtin').digest}".replace("sha256:", "")
    return models.cache_folder("policies") / f"{loaded.source.name}-{digest}.yaml"


def cached_policy(loaded, console: Console) -> Policy:
    """The policy of this model on the built-in prompts, profiled once and kept in the kvc cache."""
    prompts = load_prompts("builtin")
    path = cached_policy_path(loaded)
    if path.is_file():
        policy = load_policy(path)
        current = (policy.profile.retrieval_scheme, policy.profile.context_probe_scheme) == (RETRIEVAL_SCHEME,
                                                                                              CONTEXT_PROBE_SCHEME)
        if current:  # else profiled by an older kvc: profile again
            console.print(f"reusing the policy profiled earlier: {path}", soft_wrap=True, markup=False)
            return policy
    layers = loaded.model.config.num_hidden_layers
    columns = (TextColumn("profiling {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=progress_steps(len(prompts.prompts), layers))
        policy = profile_model(loaded, prompts, progress=lambda name: progress.update(task, advance=1, description=name))
    save_policy(policy, path)
    console.print(f"profiled {len(prompts.prompts)} prompts in {policy.profile.seconds:.0f} s; policy saved to {path}",
                  soft_wrap=True, markup=False)
    return load_policy(path)  # as every later run reads it (whole numbers read back as floats): one run identity


def embedded_policy() -> Policy:
    """The embedded model's policy on the built-in prompts (`cached_policy`; progress on stderr)."""
    return cached_policy(models.load("smollm2-135m", dtype="float32", device="cpu"), Console(stderr=True))


def run(console: Console) -> int:
    console.print("[bold]kvc demo[/]: SmolLM2-135M-Instruct, plan at 25% of the full cache, passkey retrieval")
    loaded = models.load(models.DEFAULT_MODEL, dtype="float32", device="cpu")
    policy = cached_policy(loaded, console)
    plan = compile_policy(policy, target=TARGET, max_len=PROMPT_TOKENS + 32 + NEW_TOKENS)
    console.print(f"compiled ({plan.strategy}): {human_bytes(plan.cache_bytes)} of {human_bytes(plan.full_cache_bytes)} "
                  f"for {plan.target.max_len} tokens, expected recovery {float(plan.expected_recovery.mean()):.3f}")
    table = Table(title=f"passkey in ~{PROMPT_TOKENS} tokens of filler")
    for column in ("depth", "passkey", "full cache", "kvc plan", "kvc cache bytes", "full cache bytes"):
        table.add_column(column)
    right = {"full": 0, "kvc": 0}
    for seed, depth in enumerate(DEPTHS):
        sample = passkey_sample(loaded.tokenizer, PROMPT_TOKENS, depth, seed=seed)
        full = generate(loaded, sample.text, max_new_tokens=NEW_TOKENS)
        kvc = generate(loaded, sample.text, plan=plan, max_new_tokens=NEW_TOKENS)
        marks = []
        for name, result in (("full", full), ("kvc", kvc)):
            correct = passkey_correct(sample, result.texts[0])
            right[name] += correct
            marks.append(f"{'[green]✓' if correct else '[red]✗'}[/] {result.texts[0].strip()[:24]!r}")
        table.add_row(f"{depth:.0%}", sample.passkey, *marks, human_bytes(kvc.cache_bytes), human_bytes(kvc.full_cache_bytes))
    console.print(table)
    console.print(f"full cache: {right['full']}/{len(DEPTHS)} right · kvc at {plan.compression:.0%} of the cache: "
                  f"{right['kvc']}/{len(DEPTHS)} right")
    return 0


def main() -> None:
    console = Console()
    try:
        with signals_interrupt():
            sys.exit(run(console))
    except (KvcError, Interrupted) as error:
        message = str(error) if isinstance(error, KvcError) else "interrupted"
        Console(stderr=True).print(f"[red]error:[/] {message}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
