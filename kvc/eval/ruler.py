"""RULER-style tasks beyond one needle, generated here from a seed (RULER 2404.06654; nothing downloaded).

- multikey: four "special magic number" needles of different keys in the essays; one key is asked.
- multivalue: four needles of one key; all its values are asked.
- vartrack: a chain of assignments (VAR A = 12345, VAR B = VAR A, ...) in repetitive filler; every
  variable that ends up holding the value is asked.
- fwe: frequent-words extraction: coded words drawn by a Zipf law (alpha 2); the three most frequent are asked.

Every sample is a context and a question asked after it; an answer scores the share of the expected
strings it contains. Sample i is the seed i: keys, values, positions and words.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from kvc.eval.niah import haystack_ids, insert_sentences
from kvc.eval.passkey import FILLER
from kvc.policies.errors import KvcError

ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "mellow", "noisy", "odd", "proud", "quiet", "rusty", "silent", "tidy")
NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel")
SYLLABLES = ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di", "fa", "gu", "he")
NEEDLES = 4  # multikey: keys in the context; multivalue: values of the one key
HOPS = 3  # vartrack: assignments after the first, so HOPS + 1 variables hold the value
TOP_WORDS = 3  # fwe: the most frequent words asked
VOCABULARY = 60  # fwe: distinct coded words
ZIPF_ALPHA = 2.0
DRAWS = 20  # fwe: draws of one seed tried until the top words are set apart
ANSWER_TOKENS = {"multikey": 12, "multivalue": 40, "vartrack": 28, "fwe": 24}


@dataclass(frozen=True)
class RulerSample:
    context: str
    question: str
    answers: tuple[str, ...]  # every string a complete answer contains
    num_tokens: int

    @property
    def text(self) -> str:
        return self.context + self.question


def share_found(answers: tuple[str, ...], completion: str) -> float:
    """Share of the expected strings the completion contains (case-insensitive)."""
    lowered = completion.lower()
    return sum(answer.lower() in lowered for answer in answers) / len(answers)


def magic(key: str, value: str) -> str:
    return f" One of the special magic numbers for {key} is: {value}. "


def keys(rng: random.Random, count: int) -> list[str]:
    pairs = rng.sample([(a, n) for a in ADJECTIVES for n in NOUNS], count)
    return [f"{adjective}-{noun}" for adjective, noun in pairs]


def numbers(rng: random.Random, count: int, digits: int = 7) -> list[str]:
    return [str(value) for value in rng.sample(range(10 ** (digits - 1), 10 ** digits), count)]


def in_essays(tokenizer, length: int, seed: int, inserts: list[str], question: str) -> str:
    """The essays from essay `seed` on, about `length` tokens with the question, the inserts at seeded depths."""
    rng = random.Random(f"depths-{seed}")
    room = length - len(tokenizer("".join(inserts) + question).input_ids)
    context = haystack_ids(tokenizer, room, seed)
    return insert_sentences(tokenizer, context, [(rng.random(), sentence) for sentence in inserts]).rstrip()


def sample(tokenizer, context: str, question: str, answers) -> RulerSample:
    return RulerSample(context, question, tuple(answers), len(tokenizer(context + question).input_ids))


def multikey_sample(tokenizer, length: int, seed: int = 0) -> RulerSample:
    rng = random.Random(f"multikey-{seed}")
    names, values = keys(rng, NEEDLES), numbers(rng, NEEDLES)
    asked = rng.randrange(NEEDLES)
    question = (f"\n\nQuestion: What is the special magic number for {names[asked]} mentioned in the provided text?"
                f"\nAnswer: The special magic number for {names[asked]} mentioned in the provided text is")
    context = in_essays(tokenizer, length, seed, [magic(k, v) for k, v in zip(names, values)], question)
    return sample(tokenizer, context, question, [values[asked]])


def multivalue_sample(tokenizer, length: int, seed: int = 0) -> RulerSample:
    rng = random.Random(f"multivalue-{seed}")
    (name,), values = keys(rng, 1), numbers(rng, NEEDLES)
    question = (f"\n\nQuestion: What are all the special magic numbers for {name} mentioned in the provided text?"
                f"\nAnswer: The special magic numbers for {name} mentioned in the provided text are")
    context = in_essays(tokenizer, length, seed, [magic(name, value) for value in values], question)
    return sample(tokenizer, context, question, values)


def variable_names(rng: random.Random, count: int) -> list[str]:
    names = set()
    while len(names) < count:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    return rng.sample(sorted(names), count)


def vartrack_sample(tokenizer, length: int, seed: int = 0) -> RulerSample:
    rng = random.Random(f"vartrack-{seed}")
    names, (value,) = variable_names(rng, HOPS + 1), numbers(rng, 1, digits=5)
    chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
    question = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above.\nAnswer: "
                f"According to the chain of variable assignments in the text above, {HOPS + 1} variables are "
                f"assigned the value {value}, they are:")
    room = length - len(tokenizer("".join(chain) + question).input_ids)
    per_filler = len(tokenizer(FILLER * 8, add_special_tokens=False).input_ids) / 8
    filler = FILLER * max(1, round(room / per_filler))
    depths = sorted(rng.random() for _ in chain)  # assignments in chain order
    context = insert_sentences(tokenizer, tokenizer(filler, add_special_tokens=False).input_ids,
                               list(zip(depths, chain))).rstrip()
    return sample(tokenizer, context, question, names)


def coded_words(rng: random.Random, count: int) -> list[str]:
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(3)))
    return rng.sample(sorted(words), count)


def fwe_sample(tokenizer, length: int, seed: int = 0) -> RulerSample:
    rng = random.Random(f"fwe-{seed}")
    vocabulary = coded_words(rng, VOCABULARY)
    intro = ("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words.\n")
    question = ("\n\nQuestion: What are the three most frequently appeared words in the above coded text?\nAnswer: "
                "According to the coded text above, the three most frequently appeared words are:")
    room = length - len(tokenizer(intro + question).input_ids)
    cost = {word: len(tokenizer(" " + word, add_special_tokens=False).input_ids) for word in vocabulary}
    for _ in range(DRAWS):  # the next draw of the same seed when the top words tie
        words = coded_text(rng, vocabulary, cost, room)
        counts = Counter(words).most_common()
        if len(counts) > TOP_WORDS and counts[TOP_WORDS - 1][1] > counts[TOP_WORDS][1]:
            return sample(tokenizer, intro + " ".join(words), question, [word for word, _ in counts[:TOP_WORDS]])
    raise KvcError(f"fwe at {length} tokens: the {TOP_WORDS} most frequent words are not set apart; give a longer length")


def coded_text(rng: random.Random, vocabulary: list[str], cost: dict[str, int], room: int) -> list[str]:
    """Words drawn by the Zipf law until the next one would pass `room` tokens."""
    weights = [1 / rank ** ZIPF_ALPHA for rank in range(1, len(vocabulary) + 1)]
    words, used = [], 0
    while True:
        word = rng.choices(vocabulary, weights)[0]
        if used + cost[word] > room:
            return words
        words.append(word)
        used += cost[word]


GENERATORS: dict[str, Callable[..., RulerSample]] = {
    "multikey": multikey_sample,
    "multivalue": multivalue_sample,
    "vartrack": vartrack_sample,
    "fwe": fwe_sample,
}
