"""The RULER-style tasks: seeded, deterministic generators on the real tokenizer, and their scorer on hand-made answers."""

import re
from collections import Counter

import pytest

from kvc.eval import ruler
from kvc.eval.ruler import GENERATORS, HOPS, NEEDLES, TOP_WORDS, share_found


@pytest.mark.parametrize("name", list(GENERATORS))
def test_a_seed_gives_one_sample_and_seeds_differ(smollm, name):
    first, again, other = (GENERATORS[name](smollm.tokenizer, 600, seed=seed) for seed in (4, 4, 5))
    assert first == again
    assert first.answers != other.answers
    assert abs(first.num_tokens - 600) <= 12
    assert first.num_tokens == len(smollm.tokenizer(first.context + first.question).input_ids)
    assert first.question.startswith("\n\nQuestion:") and not first.context.endswith(" ")


def test_multikey_hides_four_keys_and_asks_one(smollm):
    sample = GENERATORS["multikey"](smollm.tokenizer, 800, seed=2)
    needles = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", sample.context)
    assert len(needles) == NEEDLES and len({key for key, _ in needles}) == NEEDLES
    asked = re.search(r"number for ([a-z]+-[a-z]+) mentioned", sample.question).group(1)
    assert sample.answers == (dict(needles)[asked],)


def test_multivalue_asks_every_value_of_one_key(smollm):
    sample = GENERATORS["multivalue"](smollm.tokenizer, 800, seed=2)
    needles = re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", sample.context)
    assert len({key for key, _ in needles}) == 1 and sorted(v for _, v in needles) == sorted(sample.answers)
    assert len(sample.answers) == NEEDLES


def test_vartrack_chains_the_value_through_every_variable_in_order(smollm):
    sample = GENERATORS["vartrack"](smollm.tokenizer, 800, seed=2)
    value = re.search(r"assigned the value (\d{5}) in", sample.question).group(1)
    first, *rest = sample.answers
    assert len(sample.answers) == HOPS + 1
    positions = [sample.context.index(f"VAR {first} = {value}.")]
    for before, after in zip(sample.answers, rest):
        positions.append(sample.context.index(f"VAR {after} = VAR {before}."))
    assert positions == sorted(positions)


def test_fwe_asks_the_three_most_frequent_words(smollm):
    sample = GENERATORS["fwe"](smollm.tokenizer, 800, seed=2)
    words = sample.context.split("\n", 1)[1].split()
    ranked = Counter(words).most_common()
    assert sample.answers == tuple(word for word, _ in ranked[:TOP_WORDS])
    assert ranked[TOP_WORDS - 1][1] > ranked[TOP_WORDS][1]


def test_fwe_refuses_a_length_too_short_to_rank_words(smollm):
    with pytest.raises(ruler.KvcError, match="longer length"):
        GENERATORS["fwe"](smollm.tokenizer, 60, seed=0)


@pytest.mark.parametrize("completion, score", [
    (" 1234567, 7654321, 1111111 and 2222222.", 1.0),
    (" 1234567 and 7654321.", 0.5),
    (" 12345678", 0.25),  # a longer number contains the value: RULER's substring rule
    (" none of them", 0.0),
    ("", 0.0),
])
def test_share_found_on_hand_made_answers(completion, score):
    assert share_found(("1234567", "7654321", "1111111", "2222222"), completion) == score


def test_share_found_ignores_case():
    assert share_found(("BUCGH", "topeto"), " VAR bucgh and TOPETO") == 1.0
