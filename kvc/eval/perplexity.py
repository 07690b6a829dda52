"""Perplexity through a compressed cache: a long essay prefix is compressed, then the next
tokens are scored teacher-forced, one decode step each.

The text comes from the end of the essay collection (the haystack of `niah` starts at its
beginning), so the two tasks read different essays at the lengths evaluated here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvc.eval.niah import essays_text


@dataclass(frozen=True)
class PerplexitySample:
    prefix_ids: list[int]
    continuation_ids: list[int]


def perplexity_sample(tokenizer, length: int, continuation: int = 64, offset: int = 0) -> PerplexitySample:
    """`length` prefix tokens and the `continuation` tokens after them; `offset` picks another passage."""
    text = essays_text()
    window = (length + continuation) * 8
    end = len(text) - offset * window
    ids = tokenizer(text[max(0, end - window): end], add_special_tokens=False).input_ids
    ids = ids[-(length + continuation):]
    return PerplexitySample(ids[:length], ids[length:])


def perplexity(negative_log_likelihoods: list[float]) -> float:
    return math.exp(sum(negative_log_likelihoods) / len(negative_log_likelihoods))
