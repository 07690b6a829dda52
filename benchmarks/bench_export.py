"""Where `kvc export` of the embedded model spends its time: each graph's tracing, the writing, onnxruntime's sessions.

The demo's plan (its policy at 25%, max length 1,040, 8-bit rows) is exported `--rounds` times into a
scratch folder (removed after). Each round times the exporter's steps (through its progress
callback), counts the nodes of each saved graph, times onnxruntime opening the folder
(`OnnxGenerator`: both sessions, with onnxruntime's graph optimisations) and then decoding with it:
the prefill of a 1,000-token passkey prompt and `--steps` greedy steps after it (their median).
"""

import argparse
import json
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvc.compiler import compile_policy
from kvc.demo import NEW_TOKENS, PROMPT_TOKENS, TARGET, cached_policy
from kvc.eval.passkey import passkey_sample
from kvc.export.exporter import GRAPHS, export
from kvc.export.onnx import OnnxGenerator
from kvc.models import load
from kvc.outputs import recorded_path

RESULTS = Path(__file__).parent / "results"
STEPS = {"tracing the step graph": "step", "tracing the prefill graph": "prefill",
         "writing the graphs and weights": "writing"}


def timed_export(loaded, plan, folder, steps: int) -> dict:
    """Seconds of each exporter step, of opening the export in onnxruntime and of decoding with it."""
    marks = []
    export(loaded, plan, folder, progress=lambda step: marks.append((STEPS[step], time.perf_counter())))
    marks.append(("end", time.perf_counter()))
    seconds = {name: end - began for (name, began), (_, end) in zip(marks, marks[1:])}
    began = time.perf_counter()
    generator = OnnxGenerator(folder, device="cpu")
    seconds["sessions"] = time.perf_counter() - began
    seconds = {name: round(value, 1) for name, value in seconds.items()}
    return {**seconds, **timed_decode(generator, loaded.tokenizer, steps)}


def timed_decode(generator, tokenizer, steps: int) -> dict:
    """Seconds of the prefill of a passkey prompt and the median milliseconds of `steps` greedy steps."""
    ids = tokenizer(passkey_sample(tokenizer, PROMPT_TOKENS, 0.5, seed=1).text).input_ids
    began = time.perf_counter()
    logits, state = generator.prefill([ids])
    prefill = time.perf_counter() - began
    token, times = [[int(logits[0].argmax())]], []
    for _ in range(steps):
        began = time.perf_counter()
        logits, state = generator.step(token, state)
        times.append(time.perf_counter() - began)
        token = [[int(logits[0, -1].argmax())]]
    return {"onnx_prefill": round(prefill, 2), "onnx_step_ms": round(1000 * statistics.median(times), 1)}


def graph_sizes(folder: Path) -> dict:
    import onnx

    sizes = {}
    for name in GRAPHS:
        graph = onnx.load(folder / f"{name}.onnx", load_external_data=False).graph
        sizes[name] = {"nodes": len(graph.node), "bytes": (folder / f"{name}.onnx").stat().st_size}
    sizes["weights_bytes"] = (folder / "weights.bin").stat().st_size
    return sizes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16, help="greedy steps timed after the prefill")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_export.json")
    args = parser.parse_args()
    console = Console()
    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    plan = compile_policy(cached_policy(loaded, console), target=TARGET, max_len=PROMPT_TOKENS + 32 + NEW_TOKENS)
    rounds, sizes = [], None
    table = Table("round", "step graph s", "prefill graph s", "writing s", "onnxruntime sessions s",
                  "onnx prefill s", "onnx step ms", title="kvc export, then onnxruntime decoding")
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="kvc-bench-export-") as scratch:
            folder = Path(scratch) / "export"
            rounds.append(timed_export(loaded, plan, folder, args.steps))
            sizes = graph_sizes(folder)
        table.add_row(str(index + 1), *(f"{rounds[-1][name]:.1f}" for name in
                                        ("step", "prefill", "writing", "sessions", "onnx_prefill", "onnx_step_ms")))
    console.print(table)
    console.print(", ".join(f"{name}.onnx {sizes[name]['nodes']:,} nodes, {sizes[name]['bytes'] / 1e6:.1f} MB"
                            for name in GRAPHS) + f"; weights.bin {sizes['weights_bytes'] / 1e6:.1f} MB")
    args.json.write_text(json.dumps({
        "plan": {"max_len": plan.target.max_len, "kv_bits": plan.kv_bits, "compression": plan.compression},
        "versions": {package: version(package) for package in ("torch", "onnxscript", "onnx-ir", "onnxruntime")},
        "rounds": rounds, "graphs": sizes}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.json)}")


if __name__ == "__main__":
    main()
