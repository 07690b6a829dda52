"""Through the OpenAI HTTP API of `kvc serve`, the demo's passkeys and the needle prompts, against kvc's
own transformers runtime with the same plan.

Compiles the demo's policy at --target for --max-len tokens, starts `kvc serve` (float32, as the
runtime here runs) on a free port, sends the demo's three passkey prompts (about 1,000 tokens,
depths 0.1/0.5/0.9) and needle prompts (San Francisco needle, --needle-length tokens, depths
0/0.5/1) one at a time and then all at once, greedily, and compares each answer with
`kvc.runtime.generate` on the same plan: same text, and the passkey or needle score.
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from kvc.compiler import compile_policy
from kvc.demo import DEPTHS, NEW_TOKENS, PROMPT_TOKENS, cached_policy
from kvc.eval.niah import ANSWER_TOKENS, needle_sample, needle_score
from kvc.eval.passkey import passkey_correct, passkey_sample
from kvc.models import load
from kvc.outputs import recorded_path
from kvc.runtime.generate import generate

RESULTS = Path(__file__).parent / "results"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--max-len", type=int, default=1100)
    parser.add_argument("--needle-length", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=RESULTS / "serve_parity.json")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(plan_path: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "kvc.cli", "serve", "smollm2-135m", "--plan", str(plan_path),
                                    "--port", str(port), "--dtype", "float32", "--max-num-seqs", "8",
                                    "--kv-cache-memory-bytes", str(256 << 20)],
                                   stdout=output, stderr=subprocess.STDOUT)
    while True:
        if process.poll() is not None:
            raise SystemExit(f"kvc serve exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(2)


def main():
    args = parse_args()
    console = Console()
    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    plan = compile_policy(cached_policy(loaded, console), target=args.target, max_len=args.max_len)
    scratch = Path(tempfile.mkdtemp(prefix="kvc-serve-parity-"))  # the plan the server reads, its log
    plan_path = plan.save(scratch / "quarter.plan")
    tokenizer = loaded.tokenizer
    tasks = [("passkey", depth, passkey_sample(tokenizer, PROMPT_TOKENS, depth, seed=seed), NEW_TOKENS)
             for seed, depth in enumerate(DEPTHS)]
    tasks += [("needle", depth, needle_sample(tokenizer, args.needle_length, depth), ANSWER_TOKENS)
              for depth in (0.0, 0.5, 1.0)]

    def score(task, sample, text):
        return float(passkey_correct(sample, text)) if task == "passkey" else needle_score(text)

    runtime = [generate(loaded, sample.text, plan=plan, max_new_tokens=tokens).texts[0]
               for _, _, sample, tokens in tasks]
    port = free_port()
    server = start_server(plan_path, port, scratch / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

        def ask(task):
            reply = httpx.post(f"{url}/v1/completions", timeout=1200, json={
                "model": model, "prompt": task[2].text, "max_tokens": task[3], "temperature": 0})
            return reply.json()["choices"][0]["text"]

        alone = [ask(task) for task in tasks]
        with ThreadPoolExecutor(len(tasks)) as pool:
            together = list(pool.map(ask, tasks))
    finally:
        server.terminate()
        server.wait(120)
        shutil.rmtree(scratch, ignore_errors=True)
    table = Table(title=f"kvc serve (HTTP) vs kvc's transformers runtime, plan at {plan.compression:.0%}")
    for column in ("task", "depth", "runtime", "served alone", "served together", "same text", "scores"):
        table.add_column(column)
    rows = []
    for (task, depth, sample, _), own, one, many in zip(tasks, runtime, alone, together):
        scores = [score(task, sample, text) for text in (own, one, many)]
        rows.append({"task": task, "depth": depth, "prompt_tokens": sample.num_tokens, "runtime": own,
                     "served_alone": one, "served_together": many, "scores": scores})
        table.add_row(task, f"{depth:.1f}", repr(own[:28]), repr(one[:28]), repr(many[:28]),
                      f"{own == one} / {own == many}", " ".join(f"{s:.1f}" for s in scores))
    console.print(table)
    args.json.write_text(json.dumps({"plan": {"max_len": args.max_len, "compression": plan.compression},
                                     "rows": rows}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.json)}")


if __name__ == "__main__":
    main()
