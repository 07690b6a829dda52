"""Decode speed through onnxruntime: a plan's exported graphs against kvc's torch runtime and DynamicCache.

One plan (the demo policy at 25%, compiled for the longest length) is exported once, timed, and its
files measured. At each prompt length the prompt is prefilled once per configuration; rounds then
interleave the configurations (their order rotates), each decoding --new-tokens greedily from its
prefilled state (onnxruntime: the prefill graph's state, which the step never writes; torch: the
cache restored, as in bench_generate.py). kvc's torch runtime runs the same plan as onnxruntime,
with the same thread count. Ratios to DynamicCache are taken per round.
"""

import argparse
import json
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

import onnxruntime
import torch
import transformers
from bench_generate import HfCase, KvcCase, decode, prompt_ids, record_prefill
from rich.console import Console

from kvc.compiler import compile_policy
from kvc.demo import cached_policy
from kvc.export.exporter import export
from kvc.export.onnx import OnnxGenerator
from kvc.models import load
from kvc.outputs import recorded_path
from kvc.report import human_bytes

RESULTS = Path(__file__).parent / "results"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="512,4096", help="prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch and onnxruntime while decoding")
    parser.add_argument("--export", type=Path, default=None,
                        help="an export folder to reuse (default: export into a temporary folder, timed)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_onnx.json")
    return parser.parse_args()


class OnnxCase:
    """The exported graphs in onnxruntime, prefilled once; each decode starts from the prefill's state."""

    def __init__(self, generator: OnnxGenerator, ids):
        self.generator = generator
        _, self.prefilled = generator.prefill([ids[0].tolist()])
        self.nbytes = generator.state_bytes(self.prefilled) + generator.manifest["plan"]["table_bytes"]

    def restore(self):
        self.state = self.prefilled

    def __call__(self, token):
        logits, self.state = self.generator.step(token.numpy(), self.state)
        return torch.from_numpy(logits)


def exported(loaded, plan, args, console):
    """(the export folder, the export's seconds or None when reused, a temporary folder to remove)."""
    if args.export is not None:
        return args.export, None, None
    temporary = Path(tempfile.mkdtemp(prefix="kvc-bench-onnx-"))
    console.print("exporting (minutes) ...")
    result = export(loaded, plan, temporary / "export")
    return result.folder, result.seconds, temporary


def main():
    args = parse_args()
    console = Console(stderr=True)
    loaded = load(args.model, dtype="float32", device="cpu")
    policy = cached_policy(loaded, console)
    lengths = [int(text) for text in args.lengths.split(",")]
    plan = compile_policy(policy, 0.25, max_len=max(lengths) + args.new_tokens + 8)
    folder, export_seconds, temporary = exported(loaded, plan, args, console)
    try:
        generator = OnnxGenerator(folder, device="cpu", threads=args.threads)
        manifest = generator.manifest
        if manifest["plan"]["fingerprint"] != plan.fingerprint or manifest["plan"]["max_len"] != plan.target.max_len:
            raise SystemExit(f"{folder}: exported with another plan; leave out --export to export this one")
        results = {"model": loaded.source.name,
                   "settings": {**{k: str(v) for k, v in vars(args).items()}, "json": recorded_path(args.json),
                                "export": recorded_path(args.export)},
                   "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                                   "machine": platform.machine(), "provider": generator.providers[0]},
                   "plan": {"max_len": plan.target.max_len, "cache_bytes": plan.cache_bytes, "dtype": plan.target.dtype,
                            "kv_bits": plan.kv_bits},
                   "export": {"seconds": export_seconds, "files": manifest["files"]},
                   "lengths": {}}
        for length in lengths:
            ids = prompt_ids(loaded.tokenizer, length)
            torch.set_num_threads(2)
            first, record = record_prefill(loaded, plan, ids)
            torch.set_num_threads(args.threads)
            cases = {"DynamicCache": HfCase(loaded, record, "dynamic", plan.target.max_len),
                     "kvc torch": KvcCase(loaded, plan, record),
                     "kvc onnxruntime": OnnxCase(generator, ids)}
            for case in cases.values():  # warm-up, not timed
                decode(case, first, 2)
            names, rounds = list(cases), []
            for number in range(args.rounds):
                order = names[number % len(names):] + names[:number % len(names)]
                measured = {name: decode(cases[name], first, args.new_tokens) for name in order}
                reference, kvc_tokens = measured["DynamicCache"], measured["kvc torch"][0]
                rounds.append({name: {"tokens_per_second": args.new_tokens / wall,
                                      "wall_ratio_to_dynamic": reference[1] / wall,
                                      "same_tokens_as_kvc_torch": tokens == kvc_tokens}
                               for name, (tokens, wall, _) in measured.items()})
            results["lengths"][length] = {
                name: {"tokens_per_second": statistics.median(r[name]["tokens_per_second"] for r in rounds),
                       "wall_ratio_to_dynamic": statistics.median(r[name]["wall_ratio_to_dynamic"] for r in rounds),
                       "same_tokens_as_kvc_torch": all(r[name]["same_tokens_as_kvc_torch"] for r in rounds),
                       "cache_bytes": cases[name].nbytes, "rounds": [r[name] for r in rounds]}
                for name in names}
            cases["kvc torch"].close()
            print_length(console, length, results["lengths"][length])
        for name, size in manifest["files"].items():
            console.print(f"{name:<14} {human_bytes(size):>11}")
        if export_seconds is not None:
            console.print(f"export: {export_seconds:.0f} s")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        console.print(f"wrote {recorded_path(args.json)}")
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def print_length(console, length, measured):
    console.print(f"{length} tokens: decode tokens/s (median of rounds), ratio to DynamicCache, cache bytes")
    for name, row in measured.items():
        same = "" if row["same_tokens_as_kvc_torch"] else "  (tokens differ from kvc torch)"
        console.print(f"  {name:<16} {row['tokens_per_second']:7.1f}  x{row['wall_ratio_to_dynamic']:.2f}  "
                      f"{human_bytes(row['cache_bytes']):>11}{same}")


if __name__ == "__main__":
    main()
