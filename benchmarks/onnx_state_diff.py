"""After one prefill, where do onnxruntime's cache state and the torch runtime's differ?

`python benchmarks/onnx_state_diff.py DIR` (an export of the embedded model): prefills the demo's
10% passkey prompt in both runtimes with the export's plan and prints the prefill logits'
largest difference, how many 8-bit codes differ (and by how much), whether any slot holds another
position, and the largest differences of the quantisation parameters and frequency scores.
"""

import sys

import numpy as np
import torch

import kvc
from kvc.eval.passkey import passkey_sample
from kvc.export.graphs import store_state
from kvc.export.onnx import OnnxGenerator
from kvc.models import load
from kvc.plan import Plan


def main(folder):
    loaded = load("smollm2-135m", dtype="float32", device="cpu")
    plan = Plan.load(f"{folder}/model.plan")
    generator = OnnxGenerator(folder, device="cpu")
    ids = loaded.tokenizer(passkey_sample(loaded.tokenizer, 1000, 0.1, seed=0).text).input_ids
    logits, state = generator.prefill([ids])
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        cache = applied.cache()
        expected = loaded.model(torch.tensor([ids]), **{applied.cache_keyword: cache}).logits[0, -1]
    print("prefill logits: largest difference", float(np.abs(logits[0] - expected.numpy()).max()))
    exported = dict(zip(generator.state_names, [value.numpy() for value in state]))
    codes = total = largest_code = positions = 0
    params = scores = 0.0
    for index, layer in enumerate(cache.layers):
        for name, tensor in store_state(layer.store).items():
            got, want = exported[f"layer{index}.{name}"], tensor.float().numpy() if name == "rows" else tensor.numpy()
            if name == "codes":
                difference = np.abs(got.astype(int) - want.astype(int))
                codes, total = codes + int((difference > 0).sum()), total + difference.size
                largest_code = max(largest_code, int(difference.max()))
            elif name == "positions":
                positions += int((got != want).sum())
            elif name in ("params", "scores", "rows"):
                largest = float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max())
                params, scores = (max(params, largest), scores) if name != "scores" else (params, max(scores, largest))
            else:
                assert (got == want).all(), name
    print(f"codes differing: {codes} of {total} (by at most {largest_code}); slots holding another position: "
          f"{positions}; parameters/rows: largest difference {params}; scores: {scores}")


if __name__ == "__main__":
    main(sys.argv[1])
