"""Greedy tokens through onnxruntime against kvc's torch runtime: the demo's passkeys and five more prompts.

The demo's plan (its policy at 25%, max length 1,040) is exported (or --export reuses a folder made
from it); each prompt is continued greedily by both runtimes (`kvc.export.agreement`), reporting
whether the tokens agree, the first step where they do not, and the largest logit difference.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console

from kvc.compiler import compile_policy
from kvc.demo import DEPTHS, NEW_TOKENS, PROMPT_TOKENS, TARGET, cached_policy
from kvc.eval.niah import essays_text, needle_sample
from kvc.eval.passkey import passkey_sample
from kvc.export.agreement import compare
from kvc.export.exporter import export
from kvc.export.onnx import OnnxGenerator
from kvc.models import load
from kvc.outputs import recorded_path
from kvc.runtime.generate import encode_prompts

RESULTS = Path(__file__).parent / "results"
OTHERS = {  # name -> (prompt text, chat template)
    "needle at 50%": None,
    "chat: capital": ("What is the capital of France? Answer in one sentence.", True),
    "chat: haiku": ("Write a haiku about the sea.", True),
    "short plain": ("The three primary colours are", False),
    "essay, 600 tokens": None,
}


def prompts(tokenizer):
    """(name, token ids) of the demo's three passkeys and five more prompts."""
    for seed, depth in enumerate(DEPTHS):
        yield f"passkey at {depth:.0%}", encode_prompts(tokenizer, [passkey_sample(tokenizer, PROMPT_TOKENS, depth,
                                                                                   seed=seed).text])[0]
    for name, given in OTHERS.items():
        if name.startswith("needle"):
            text, chat = needle_sample(tokenizer, PROMPT_TOKENS - 40, 0.5).text, False
        elif name.startswith("essay"):
            ids = tokenizer(essays_text(3)[:6000], add_special_tokens=False).input_ids[:600]
            yield name, ids
            continue
        else:
            text, chat = given
        yield name, encode_prompts(tokenizer, [text], chat)[0]


def agreements(loaded, plan, generator, new_tokens, console) -> dict:
    """Each prompt's agreement (as a dict), printed a line each."""
    rows = {}
    for name, ids in prompts(loaded.tokenizer):
        agreement = compare(loaded, plan, generator, ids, new_tokens)
        rows[name] = agreement.to_dict()
        verdict = "same tokens" if agreement.same_tokens else f"first differs at step {agreement.first_divergence}"
        console.print(f"{name:<20} {agreement.prompt_tokens:5d} tokens  {verdict:<26} max |logit diff| "
                      f"{agreement.max_logit_difference:.2e}  {loaded.tokenizer.decode(agreement.torch_tokens)[:40]!r}",
                      highlight=False)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=None, help="an export of the demo's plan to reuse")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=RESULTS / "onnx_agreement.json")
    args = parser.parse_args()
    console = Console(width=max(Console().width, 120))
    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    plan = compile_policy(cached_policy(loaded, console), target=TARGET, max_len=PROMPT_TOKENS + 32 + NEW_TOKENS)
    with tempfile.TemporaryDirectory(prefix="kvc-agreement-") as scratch:  # a fresh export is removed after
        folder, seconds = args.export, None
        if folder is None:
            began = time.perf_counter()
            folder = export(loaded, plan, Path(scratch) / "export").folder
            seconds = time.perf_counter() - began
        rows = agreements(loaded, plan, OnnxGenerator(folder, device="cpu"), args.new_tokens, console)
    agree = sum(row["same_tokens"] for row in rows.values())
    console.print(f"{agree}/{len(rows)} prompts: onnxruntime's greedy tokens are the torch runtime's")
    args.json.write_text(json.dumps({"plan": {"max_len": plan.target.max_len, "cache_bytes": plan.cache_bytes,
                                              "compression": plan.compression},
                                     "new_tokens": args.new_tokens, "export_seconds": seconds,
                                     "export": recorded_path(args.export) if args.export else "a fresh export (removed)",
                                     "prompts": rows}, indent=1) + "\n")
    console.print(f"wrote {recorded_path(args.json)}")


if __name__ == "__main__":
    main()
