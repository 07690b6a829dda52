"""The recovery task on the embedded model: the full cache holds all the attention, StreamingLLM
exactly its sinks and recent window."""

import pytest

from kvc.eval.baselines import method_plan
from kvc.eval.perplexity import perplexity_sample
from kvc.eval.recovery import attention_recovery, full_attention_rows, held_positions, recovery


@pytest.fixture(scope="module")
def text(smollm):
    return perplexity_sample(smollm.tokenizer, 160, continuation=6)


def test_the_full_cache_holds_all_the_attention(smollm, text):
    score, nbytes = attention_recovery(smollm, method_plan("full", smollm, None, 166, 1.0), text)
    assert score == pytest.approx(1.0, abs=1e-5) and nbytes > 0


def test_streamingllm_holds_its_sinks_and_recent_window(smollm, text):
    plan = method_plan("streamingllm", smollm, None, 166, 0.25)
    sinks, window = int(plan.sinks[0, 0]), int(plan.window[0, 0])
    held, nbytes = held_positions(smollm, plan, text)
    assert nbytes == plan.cache_bytes and len(held) == 6
    for step, layers in enumerate(held):
        query = 160 + step
        expected = list(range(sinks)) + list(range(query - window + 1, query + 1))
        assert all(positions.tolist() == expected for heads in layers for positions in heads)
    rows = full_attention_rows(smollm, text.prefix_ids + text.continuation_ids, 160)
    assert len(rows) == 30 and rows[0].shape == (9, 6, 166)
    assert ((rows[0].sum(-1) - 1).abs() < 1e-5).all()
    by_definition = sum(float(r[:, s, :sinks].sum() + r[:, s, 160 + s - window + 1:160 + s + 1].sum())
                        for r in rows for s in range(6)) / (30 * 9 * 6)
    assert recovery(rows, held) == pytest.approx(by_definition, abs=1e-6)
    assert 0.3 < by_definition < 1.0
