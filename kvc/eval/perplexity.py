"""Perplexity through a compressed cache: a long essay prefix is compressed, then the next
tokens are scored teacher-forced, one decode step each (`teacher_forced`, which the recovery
task shares).

The text comes from the end of the essay collection (the haystack of `niah` starts at its
beginning), so the two tasks read different essays at the lengths evaluated here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvc.eval.niah import essays_text
from kvc.models import LoadedModel
from kvc.policies.errors import KvcError
from kvc.plan import Plan
from kvc.runtime.apply import apply


@dataclass(frozen=True)
class PerplexitySample:
    prefix_ids: list[int]
    continuation_ids: list[int]


def perplexity_sample(tokenizer, length: int, continuation: int = 64, offset: int = 0) -> PerplexitySample:
    """`length` prefix tokens and the `continuation` tokens after them; `offset` picks another passage."""
    text = essays_text()
    window = (length + continuation) * 8
    end = len(text) - offset * window
    if end < window:
        raise KvcError(f"perplexity passage {offset} of {length} + {continuation} tokens lies before the essays' start "
                       f"(they hold {len(text) // window}); evaluate fewer or shorter samples")
    ids = tokenizer(text[max(0, end - window): end], add_special_tokens=False).input_ids
    ids = ids[-(length + continuation):]
    return PerplexitySample(ids[:length], ids[length:])


def perplexity(negative_log_likelihoods: list[float]) -> float:
    return math.exp(sum(negative_log_likelihoods) / len(negative_log_likelihoods))


def teacher_forced(loaded: LoadedModel, plan: Plan, sample: PerplexitySample) -> Iterator[tuple[torch.Tensor, object]]:
    """Prefill the prefix into the plan's cache, then feed the continuation one token per step.

    Yields (the last position's logits, the cache) after the prefill and after each step; stop
    early (inside `contextlib.closing`) to leave tokens unfed."""
    model = loaded.model
    plan.check_length(len(sample.prefix_ids) + len(sample.continuation_ids))
    with torch.no_grad(), apply(loaded, plan) as applied:
        cache, keyword = applied.cache(), applied.cache_keyword
        inputs = torch.tensor([sample.prefix_ids], device=model.device)
        yield model(input_ids=inputs, **{keyword: cache}, use_cache=True).logits[0, -1], cache
        for token in sample.continuation_ids:
            inputs = torch.tensor([[token]], device=model.device)
            yield model(input_ids=inputs, **{keyword: cache}, use_cache=True).logits[0, -1], cache
