"""Do the exported graphs decode as kvc's torch runtime does? Greedy tokens and logits, step by step.

Both runtimes are fed the torch runtime's greedy tokens, so their logits stay comparable at every
step; the onnxruntime path agrees when its argmax is the torch token at every step (then its own
greedy continuation is the same), and otherwise the first step where it is not is reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

import kvc
from kvc.export.onnx import OnnxGenerator
from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.runtime.step import Step


@dataclass
class Agreement:
    prompt_tokens: int
    torch_tokens: list[int]
    same_tokens: bool
    first_divergence: int | None  # the step where onnxruntime's argmax is not the torch token
    logit_differences: list[float]  # per step (0: the prefill's last position), the largest |difference|

    @property
    def max_logit_difference(self) -> float:
        return max(self.logit_differences)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_logit_difference": self.max_logit_difference}


def torch_greedy(loaded: LoadedModel, plan: Plan, ids: list[int], new_tokens: int):
    """The torch runtime's greedy tokens and the logits (new_tokens, vocab) each was chosen from."""
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        cache = applied.cache()
        logits = [loaded.model(torch.tensor([ids]), **{applied.cache_keyword: cache}).logits[0, -1]]
        step = Step(loaded.model, cache)
        tokens = [int(logits[-1].argmax())]
        for _ in range(new_tokens - 1):
            logits.append(step(torch.tensor([[tokens[-1]]]))[0, -1])
            tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits).numpy()


def compare(loaded: LoadedModel, plan: Plan, generator: OnnxGenerator, ids: list[int], new_tokens: int) -> Agreement:
    tokens, expected = torch_greedy(loaded, plan, ids, new_tokens)
    logits, state = generator.prefill([ids])
    got = [logits[0]]
    for token in tokens[:-1]:
        logits, state = generator.step(np.array([[token]]), state)
        got.append(logits[0, -1])
    got = np.stack(got)
    differs = [index for index, row in enumerate(got) if int(row.argmax()) != tokens[index]]
    return Agreement(len(ids), tokens, not differs, differs[0] if differs else None,
                     [float(row) for row in np.abs(got - expected).max(-1)])
