"""Task builders and scorers on the real tokenizer and on hand-made answers."""

import pytest

from kvc.eval.baselines import METHODS
from kvc.eval.harness import (
    TASKS,
    needle_samples,
    new_tokens,
    passkey_samples,
    perplexity_samples,
)
from kvc.eval.niah import ANSWER_TOKENS, NEEDLE, QUESTION, needle_sample, needle_score
from kvc.eval.passkey import INTRO, PasskeySample, passkey_correct, passkey_sample
from kvc.eval.passkey import QUESTION as PASSKEY_QUESTION
from kvc.eval.passkey import needle as passkey_needle
from kvc.eval.perplexity import perplexity_sample
from kvc.eval.settings import LOWER_IS_BETTER, METHOD_NAMES, PUBLISHED, TASK_NAMES, UNASKED_TASKS, Settings
from kvc.policies.errors import KvcError


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt_has_the_key_at_its_depth(smollm, depth):
    sample = passkey_sample(smollm.tokenizer, 600, depth, seed=7)
    assert abs(sample.num_tokens - 600) <= 12
    needle = passkey_needle(sample.passkey)
    at = sample.text.index(needle) - len(INTRO)
    filler = len(sample.text) - len(INTRO) - len(needle) - len(PASSKEY_QUESTION)
    assert abs(at / filler - depth) < 0.03
    assert sample.text.endswith("The pass key is")


@pytest.mark.parametrize(
    "completion, right",
    [(" 41190. Remember", True), (" 41 190.", True), (" 41191.", False), (" the pass key.", False), ("", False)],
)
def test_passkey_scorer(completion, right):
    assert passkey_correct(PasskeySample("", "", "41190", 0.5, 0), completion) is right


def test_passkeys_differ_by_seed(smollm):
    keys = {passkey_sample(smollm.tokenizer, 200, 0.5, seed=s).passkey for s in range(5)}
    assert len(keys) == 5


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_a_sentence_break(smollm, depth):
    sample = needle_sample(smollm.tokenizer, 400, depth)
    assert abs(sample.num_tokens - 400) <= 8
    at = sample.text.index(NEEDLE.strip())
    haystack = len(sample.text) - len(NEEDLE) - len(QUESTION)
    assert abs(at / haystack - depth) < 0.05
    before = sample.text[:at].rstrip()
    if 0.0 < depth < 1.0:  # the protocol appends the needle at the very end for depth 1.0
        assert before.endswith(".")


@pytest.mark.parametrize(
    "completion, score",
    [
        (" eat a sandwich and sit in Dolores Park on a sunny day.", 1.0),
        (" to eat a Sandwich.", 0.5),
        (" sit in dolores park", 0.5),
        (" visit the Golden Gate Bridge.", 0.0),
    ],
)
def test_needle_scorer(completion, score):
    assert needle_score(completion) == score


def test_the_needle_answer_fits_in_its_decoded_tokens(smollm):
    """The whole answer after the question's "... San Francisco is", with the sentence's period."""
    answer = NEEDLE.split(" is", 1)[1].rstrip()
    assert answer.startswith(" eat") and answer.endswith("day.")
    assert len(smollm.tokenizer(" to" + answer, add_special_tokens=False).input_ids) <= ANSWER_TOKENS


def test_each_task_decodes_its_own_answer_length_unless_told():
    own = Settings(tasks=[], methods=[], budgets=[], lengths=[], depths=[], continuation=32)
    assert (new_tokens("passkey", own), new_tokens("niah", own), new_tokens("ppl", own)) == (12, ANSWER_TOKENS, 32)
    told = Settings(tasks=[], methods=[], budgets=[], lengths=[], depths=[], answer_tokens=5, continuation=32)
    assert (new_tokens("passkey", told), new_tokens("niah", told), new_tokens("ppl", told)) == (5, 5, 32)


def test_the_names_the_cli_and_reports_read_are_the_tasks_and_methods_the_harness_runs():
    assert tuple(TASKS) == TASK_NAMES
    assert tuple(METHODS) == METHOD_NAMES
    assert set(PUBLISHED) < set(METHOD_NAMES)
    assert tuple(name for name, task in TASKS.items() if not task.asks) == UNASKED_TASKS
    assert tuple(name for name, task in TASKS.items() if not task.higher_is_better) == LOWER_IS_BETTER


def test_samples_are_other_haystacks_and_passages(smollm):
    settings = Settings(tasks=[], methods=[], budgets=[], lengths=[], depths=[], samples=3, continuation=8)
    needles = needle_samples(smollm.tokenizer, 300, [0.5], settings)
    assert [s.index for s in needles] == [0, 1, 2]
    contexts = [smollm.tokenizer.decode(s.payload.context_ids) for s in needles]
    assert len(set(contexts)) == 3 and all(NEEDLE.strip() in context for context in contexts)
    assert all(smollm.tokenizer.decode(s.payload.question_ids) == QUESTION for s in needles)
    passages = perplexity_samples(smollm.tokenizer, 64, [], settings)
    assert [s.index for s in passages] == [0, 1, 2]
    assert len({tuple(s.payload.prefix_ids) for s in passages}) == 3
    assert all(len(s.payload.prefix_ids) == 64 and len(s.payload.continuation_ids) == 8 for s in passages)


def test_first_sample_moves_every_task_to_later_samples(smollm):
    later = Settings(tasks=[], methods=[], budgets=[], lengths=[], depths=[], samples=2, first_sample=3, continuation=8)
    passages = perplexity_samples(smollm.tokenizer, 64, [], later)
    assert [s.index for s in passages] == [3, 4]
    assert passages[0].payload == perplexity_sample(smollm.tokenizer, 64, 8, offset=3)
    keys = [s.score(sample.passkey) for s in passkey_samples(smollm.tokenizer, 200, [0.5], later)
            for sample in [passkey_sample(smollm.tokenizer, 200, 0.5, seed=3)]]
    assert keys == [1.0, 0.0]  # sample 3 is the key of seed 3, sample 4 another one
    assert [s.index for s in needle_samples(smollm.tokenizer, 300, [0.5], later)] == [3, 4]


def test_passages_beyond_the_essays_are_refused(smollm):
    far = Settings(tasks=[], methods=[], budgets=[], lengths=[], depths=[], first_sample=18, continuation=32)
    assert len(perplexity_samples(smollm.tokenizer, 4096, [], far)[0].payload.prefix_ids) == 4096
    with pytest.raises(KvcError, match="lies before the essays' start"):
        perplexity_samples(smollm.tokenizer, 4096, [], Settings(**{**far.__dict__, "first_sample": 19}))
