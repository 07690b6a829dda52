"""The runtime's promise on the embedded model: at 25% of the full cache's bytes, a plan compiled
from a real profile answers a passkey hidden in about 1,000 tokens of filler, at several depths,
as the full cache does."""

import pytest

from kvc.compiler import compile_policy
from kvc.eval.passkey import passkey_correct, passkey_sample
from kvc.runtime.generate import generate


@pytest.fixture(scope="module")
def quarter_plan(passkey_policy):
    return compile_policy(passkey_policy, 0.25, max_len=1040, dtype="fp32")


@pytest.mark.parametrize("seed, depth", [(0, 0.1), (1, 0.5), (2, 0.9)])
def test_a_quarter_of_the_cache_answers_the_passkey_like_the_full_cache(smollm, quarter_plan, seed, depth):
    sample = passkey_sample(smollm.tokenizer, 1000, depth, seed=seed)
    full = generate(smollm, sample.text, max_new_tokens=8)
    kvc = generate(smollm, sample.text, plan=quarter_plan, max_new_tokens=8)
    assert passkey_correct(sample, full.texts[0]), full.texts[0]
    assert passkey_correct(sample, kvc.texts[0]), kvc.texts[0]
    assert kvc.cache_bytes == quarter_plan.cache_bytes <= 0.25 * quarter_plan.full_cache_bytes
    assert kvc.cache_bytes < 0.27 * kvc.full_cache_bytes  # against a full cache of these tokens
