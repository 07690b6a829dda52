"""Profiling cost against a plain forward pass on the embedded model (CPU), at 512, 2K and 8K tokens.

Each measurement runs in a fresh process: the model is loaded, one warm-up pass runs at 128
tokens, then the timed pass. Peak memory is the highest resident set size sampled during the
timed pass, less the resident size just before it (the pass's own working memory). Forward and
profile processes alternate, --repeats of each per length, and the medians are compared: this
shared CPU's speed drifts by 20% from minute to minute. Targets (issue 3): statistics add at
most 50% to the forward time; peak memory at 8K tokens at most 1.5 × a plain forward's. Prints a table and writes benchmarks/results/bench_profile_t{threads}.json.

    .venv/bin/python benchmarks/bench_profile.py [--lengths 512 2048 8192] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODES = ("forward", "profile")


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples the resident set size every few milliseconds in a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.running = interval, resident_bytes(), True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())


def benchmark_tokens(tokenizer, length: int):
    """`length` tokens of the built-in profiling prompts, repeated as needed."""
    import torch

    from kvc.profiler.prompts import load_prompts, prompt_token_ids

    ids: list[int] = []
    prompts = load_prompts("builtin").prompts
    while len(ids) < length:
        for prompt in prompts:
            ids += prompt_token_ids(prompt, tokenizer)
    return torch.tensor(ids[:length]).unsqueeze(0)


def measure(mode: str, length: int) -> dict:
    """One timed pass in this process (the child side)."""
    import torch

    from kvc import models
    from kvc.policies.tokens import punctuation_token_ids, special_token_ids
    from kvc.profiler.capture import capturing
    from kvc.profiler.measures import Ratios
    from kvc.profiler.profile import StatisticsObserver, TokenizedPrompt

    loaded = models.load("smollm2-135m", dtype="float32", device="cpu")
    model = loaded.model
    observer = StatisticsObserver(model.config.num_hidden_layers, special_token_ids(loaded.tokenizer),
                                  punctuation_token_ids(loaded.tokenizer), Ratios())

    def run(ids):
        if mode == "forward":
            model.base_model(input_ids=ids, use_cache=False)
            return
        with capturing(model, observer):
            observer.start(TokenizedPrompt("benchmark", ids[0]))
            model.base_model(input_ids=ids, use_cache=False)

    ids = benchmark_tokens(loaded.tokenizer, length)
    with torch.inference_mode():
        run(ids[:, :128])
        before = resident_bytes()
        with PeakSampler() as sampler:
            started = time.perf_counter()
            run(ids)
            seconds = time.perf_counter() - started
    return {"mode": mode, "tokens": length, "seconds": seconds, "peak_mib": (sampler.peak - before) / 2**20,
            "threads": torch.get_num_threads()}


def run_child(mode: str, length: int, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(length)]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per mode and length, alternating (medians are reported)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    for length in args.lengths:
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):  # alternating, so both modes see the same machine
            for mode in MODES:
                runs[mode].append(run_child(mode, length, args.threads))
        seconds = {mode: statistics.median(run["seconds"] for run in runs[mode]) for mode in MODES}
        peaks = {mode: statistics.median(run["peak_mib"] for run in runs[mode]) for mode in MODES}
        rows.append({
            "tokens": length, "threads": runs["forward"][0]["threads"], "repeats": args.repeats,
            "forward_s": seconds["forward"], "profile_s": seconds["profile"],
            "time_ratio": seconds["profile"] / seconds["forward"],
            "forward_peak_mib": peaks["forward"], "profile_peak_mib": peaks["profile"],
            "memory_ratio": peaks["profile"] / max(peaks["forward"], 1e-9),
            "runs": runs,
        })
    table = Table(title="kvc profile vs a plain forward (smollm2-135m, float32, CPU)")
    for column in ("tokens", "forward s", "profile s", "time ×", "forward peak MiB", "profile peak MiB", "memory ×"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["tokens"]), f"{row['forward_s']:.2f}", f"{row['profile_s']:.2f}", f"{row['time_ratio']:.2f}",
                      f"{row['forward_peak_mib']:.0f}", f"{row['profile_peak_mib']:.0f}", f"{row['memory_ratio']:.2f}")
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_profile_t{rows[0]['threads']}.json"
    path.write_text(json.dumps({"benchmark": "bench_profile", "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
