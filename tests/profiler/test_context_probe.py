"""The profiler's context probe: its scores are the runtime's, and its curves count them (the
embedded model's curves: test_profiler_embedded.py)."""

import pytest
import torch

import kvc.profiler.context_probe as context_probe
from kvc.policies.probes import POOL_KERNEL
from kvc.profiler.context_probe import SCORE_POINTS, context_scores, probe_sequence, score_shares
from kvc.runtime.kernels import pool_scores
from kvc.runtime.probe import probe_attention


@pytest.mark.parametrize("kv_heads, group, context, probe", [(3, 3, 37, 11), (2, 4, 5, 40), (1, 2, 64, 1), (4, 1, 9, 9)])
def test_context_scores_are_the_runtime_probes(monkeypatch, kv_heads, group, context, probe):
    # Equal KV heads and group size (3 and 3, the embedded model's) catch a product that
    # broadcasts the KV heads against the query group; a small block splits the probe's queries.
    monkeypatch.setattr(context_probe, "QUERY_BLOCK", 4)
    generator = torch.Generator().manual_seed(kv_heads * 100 + context)
    length, head_dim = context + probe, 8
    query = torch.randn(kv_heads * group, length, head_dim, generator=generator)
    key = torch.randn(kv_heads, length, head_dim, generator=generator)
    value = torch.randn(kv_heads, length, head_dim, generator=generator)
    measured = context_scores(query, key, context, 0.5)
    start = torch.zeros(1, dtype=torch.long)
    _, best = probe_attention(query[None, :, context:], key[None], value[None], start, 0.5)
    assert measured.shape == (kv_heads, context)
    torch.testing.assert_close(measured, pool_scores(best, start, POOL_KERNEL)[0], rtol=1e-5, atol=1e-6)


def test_score_shares_count_the_keys_at_or_above_each_point():
    scores = torch.tensor([[0.0, 1e-3, 0.02, 0.5], [1.0, 1.0, 1.0, 1.0]])
    shares = score_shares(scores)
    assert shares.shape == (2, len(SCORE_POINTS)) and shares.dtype == torch.float64
    at = {point: index for index, point in enumerate(SCORE_POINTS)}
    assert shares[0, at[1e-3]] == 0.75 and shares[0, at[0.01]] == 0.5 and shares[0, at[1.0]] == 0.0
    assert shares[1].tolist() == [1.0] * len(SCORE_POINTS)


def test_probe_sequence_repeats_the_prompt_without_special_tokens():
    sequence, context = probe_sequence([1, 7, 8, 2, 9], [50, 51], special={1, 2}, limit=100)
    assert (sequence, context) == ([1, 7, 8, 2, 9, 50, 51, 7, 8, 9], 5)
    # Positions for the prompt, the request and the copy: a long prompt is cut to fit them.
    sequence, context = probe_sequence(list(range(3, 200)), [50, 51], special=set(), limit=42)
    assert context == 20 and len(sequence) == 42
