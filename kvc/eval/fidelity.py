"""Generation fidelity: a long greedy answer through a compressed cache against the full cache's.

Open-ended chat prompts (an essay, then a request about it: summarise it, its main ideas, a reply
to its author) are answered greedily for 128 tokens; each method's tokens are compared with the
full cache's: the first position where they differ, the share of positions holding the same
token, the share of repeated 4-grams (a decoding loop repeats most of its 4-grams), and whether
the answer loops where the full cache's does not (`new_loop`: at least LOOP_REPETITION of its
4-grams repeated, against fewer in the full cache's; the 135M model's own greedy answers loop on
about half of these prompts, so a loop only counts against a method where the full cache has
none). Sample i reads the essays from the middle of the collection on (the needle's haystacks
start at its beginning, perplexity passages at its end) with request i.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvc.eval.niah import essays, haystack_ids

ANSWER_TOKENS = 128
NGRAM = 4
# An answer repeating this share of its 4-grams loops: a phrase or a list item said again and again
# ("Super-angels compete with both angels and VCs." four times in a row is 0.37).
LOOP_REPETITION = 0.3
REQUESTS = (
    "Write a summary of the essay above in a few paragraphs.",
    "What are the main ideas of the text above? Explain each of them.",
    "Write a reply to the author of this essay: what do you agree with, and what not?",
)


@dataclass(frozen=True)
class FidelitySample:
    context: str  # the chat template up to the request, the essay included
    question: str  # the request and the rest of the template: the assistant's turn begins after it
    num_tokens: int


def fidelity_sample(tokenizer, length: int, index: int = 0) -> FidelitySample:
    """A chat prompt of about `length` tokens: essays from the middle of the collection, then request `index`."""
    request = "\n\n" + REQUESTS[index % len(REQUESTS)]
    template = lambda content: tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    overhead = len(tokenizer(template(request), add_special_tokens=False).input_ids)
    essay = tokenizer.decode(haystack_ids(tokenizer, length - overhead, len(essays()) // 2 + index)).strip()
    text = template(essay + request)
    split = text.rindex(request)
    return FidelitySample(text[:split], text[split:], len(tokenizer(text, add_special_tokens=False).input_ids))


def first_difference(tokens: list[int], reference: list[int]) -> int:
    """The first position where the two sequences differ (a shorter one differs where it ends);
    the common length when they agree throughout."""
    for position, (token, expected) in enumerate(zip(tokens, reference)):
        if token != expected:
            return position
    return min(len(tokens), len(reference))


def identical_share(tokens: list[int], reference: list[int]) -> float:
    """Share of positions (over the longer sequence) that hold the same token in both."""
    longest = max(len(tokens), len(reference))
    if longest == 0:
        return 1.0
    return sum(token == expected for token, expected in zip(tokens, reference)) / longest


def repetition_rate(tokens: list[int], n: int = NGRAM) -> float:
    """Share of the sequence's n-grams that already occurred earlier in it (0 when it has none)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def fidelity_metrics(tokens: list[int], reference: list[int]) -> dict:
    repetition = repetition_rate(tokens)
    new_loop = repetition >= LOOP_REPETITION > repetition_rate(reference)
    return {"first_difference": first_difference(tokens, reference),
            "identical": round(identical_share(tokens, reference), 4),
            "repetition": round(repetition, 4), "new_loop": float(new_loop)}
