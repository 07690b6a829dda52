"""The numeric passkey task: a five-digit key hidden at a chosen depth in repetitive filler.

The prompt ends with "The pass key is" so a base or chat model completes it; the answer is
right when the completion contains the key's digits. Filler and key are generated, never
drawn from the profiling prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"
ANSWER_TOKENS = 12  # decoded tokens: the five digits come first


@dataclass(frozen=True)
class PasskeySample:
    context: str
    question: str  # asked after the context
    passkey: str
    depth: float
    num_tokens: int

    @property
    def text(self) -> str:
        return self.context + self.question


def needle(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "


def passkey_sample(tokenizer, length: int, depth: float, seed: int = 0) -> PasskeySample:
    """A prompt of about `length` tokens with the key after `depth` (0..1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    passkey = str(random.Random(seed).randint(10000, 99999))
    fixed = len(tokenizer(INTRO + needle(passkey) + QUESTION).input_ids)
    per_filler = len(tokenizer(FILLER * 8, add_special_tokens=False).input_ids) / 8
    repeats = max(1, round((length - fixed) / per_filler))
    before = round(repeats * depth)
    context = (INTRO + FILLER * before + needle(passkey) + FILLER * (repeats - before)).rstrip()
    question = " " + QUESTION
    return PasskeySample(context, question, passkey, depth, len(tokenizer(context + question).input_ids))


def passkey_correct(sample: PasskeySample, completion: str) -> bool:
    return sample.passkey in completion.replace(" ", "")
