"""Where `kvc export` of the embedded model spends its time: each graph's tracing, the writing, onnxruntime's sessions.

The demo's plan (its policy at 25%, max length 1,040, 8-bit rows) is exported `--rounds` times into a
scratch folder (removed after). Each round times the exporter's steps (through its progress
callback), counts the nodes of each saved graph and times onnxruntime opening the folder
(`OnnxGenerator`: both sessions, with onnxruntime's graph optimisations).
"""

import argparse
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvc.compiler import compile_policy
from kvc.demo import NEW_TOKENS, PROMPT_TOKENS, TARGET, cached_policy
from kvc.export.exporter import GRAPHS, export
from kvc.export.onnx import OnnxGenerator
from kvc.models import load
from kvc.outputs import recorded_path

RESULTS = Path(__file__).parent / "results"
STEPS = {"tracing the step graph": "step", "tracing the prefill graph": "prefill",
         "writing the graphs and weights": "writing"}


def timed_export(loaded, plan, folder) -> dict:
    """Seconds of each exporter step and of opening the export in onnxruntime."""
    marks = []
    export(loaded, plan, folder, progress=lambda step: marks.append((STEPS[step], time.perf_counter())))
    marks.append(("end", time.perf_counter()))
    seconds = {name: end - began for (name, began), (_, end) in zip(marks, marks[1:])}
    began = time.perf_counter()
    OnnxGenerator(folder, device="cpu")
    seconds["sessions"] = time.perf_counter() - began
    return {name: round(value, 1) for name, value in seconds.items()}


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
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_export.json")
    args = parser.parse_args()
    console = Console()
    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    plan = compile_policy(cached_policy(loaded, console), target=TARGET, max_len=PROMPT_TOKENS + 32 + NEW_TOKENS)
    rounds, sizes = [], None
    table = Table("round", "step graph", "prefill graph", "writing", "onnxruntime sessions", title="kvc export, seconds")
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="kvc-bench-export-") as scratch:
            folder = Path(scratch) / "export"
            rounds.append(timed_export(loaded, plan, folder))
            sizes = graph_sizes(folder)
        table.add_row(str(index + 1), *(f"{rounds[-1][name]:.1f}" for name in ("step", "prefill", "writing", "sessions")))
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
