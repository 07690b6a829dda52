"""The generation-fidelity metrics on hand-made token sequences, and its prompts on the real tokenizer."""

import pytest

from kvc.eval.fidelity import (
    REQUESTS,
    fidelity_metrics,
    fidelity_sample,
    first_difference,
    identical_share,
    repetition_rate,
)


@pytest.mark.parametrize("tokens, reference, first, same", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 4, 1.0),
    ([1, 2, 9, 4], [1, 2, 3, 4], 2, 0.75),
    ([5, 2, 3, 4], [1, 2, 3, 4], 0, 0.75),
    ([1, 2], [1, 2, 3, 4], 2, 0.5),  # stopped early: the missing tokens differ
    ([1, 2, 3, 4, 5, 6], [1, 2, 3], 3, 0.5),
    ([], [], 0, 1.0),
])
def test_first_difference_and_identical_share(tokens, reference, first, same):
    assert first_difference(tokens, reference) == first
    assert identical_share(tokens, reference) == same


@pytest.mark.parametrize("tokens, rate", [
    ([1, 2, 3, 4, 5, 6, 7, 8], 0.0),  # 5 distinct 4-grams
    ([1, 2, 3, 4] * 3, 1 - 4 / 9),  # a loop: 9 4-grams, 4 distinct
    ([7] * 10, 1 - 1 / 7),
    ([1, 2, 3], 0.0),  # no 4-gram at all
])
def test_repetition_rate(tokens, rate):
    assert repetition_rate(tokens) == pytest.approx(rate)


def test_metrics_of_a_loop_against_the_reference():
    reference = list(range(20))
    looping = list(range(5)) + [1, 2, 3, 4] * 3 + [0, 0, 0]
    assert fidelity_metrics(looping, reference) == {"first_difference": 5, "identical": 0.25,  # 17 4-grams, 8 distinct
                                                    "repetition": round(9 / 17, 4), "new_loop": 1.0}


@pytest.mark.parametrize("tokens, reference, new_loop", [
    ([1, 2, 3, 4] * 5, list(range(20)), 1.0),  # loops where the full cache does not
    ([1, 2, 3, 4] * 5, [5, 6, 7, 8] * 5, 0.0),  # the full cache loops as well
    (list(range(20)), [1, 2, 3, 4] * 5, 0.0),  # only the full cache loops
    (list(range(10)) + list(range(4)), list(range(20)), 0.0),  # one 4-gram of 11 repeated: below LOOP_REPETITION
])
def test_a_loop_counts_only_where_the_full_cache_has_none(tokens, reference, new_loop):
    assert fidelity_metrics(tokens, reference)["new_loop"] == new_loop


def test_fidelity_prompt_is_a_chat_turn_whose_request_comes_last(smollm):
    sample = fidelity_sample(smollm.tokenizer, 500, index=1)
    assert sample == fidelity_sample(smollm.tokenizer, 500, index=1)
    assert abs(sample.num_tokens - 500) <= 8
    assert sample.question.startswith("\n\n" + REQUESTS[1]) and sample.question.rstrip().endswith("assistant")
    assert "<|im_start|>user" in sample.context and REQUESTS[1] not in sample.context
