"""Ragged decode attention: the Triton kernels (interpreted) against the PyTorch reference, and the
reference against per-head scaled_dot_product_attention on the materialised filled slots."""

import pytest
import torch
import torch.nn.functional as F

from kvc.runtime.kernels import (
    decode_attention,
    decode_attention_reference,
    decode_attention_triton,
    use_triton,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (batch, group, head_dim, capacities, num_splits, dtype, return_probs)
CASES = [
    (1, 1, 64, [5, 0, 1, 37], None, torch.float32, True),
    (3, 3, 80, [0, 1, 20, 33], 3, torch.float32, True),
    (3, 4, 64, [17, 1, 0], 3, torch.float32, False),
    (1, 4, 48, [150, 3], None, torch.float32, True),
    (3, 1, 48, [150, 0, 64], 2, torch.float32, False),
    (3, 3, 64, [9, 0, 45, 1], None, torch.bfloat16, True),
    (1, 4, 80, [31, 2], 3, torch.bfloat16, True),
    (3, 4, 48, [1, 70, 0], None, torch.bfloat16, False),
    (3, 3, 64, [40, 7], 3, torch.float16, True),
]


def case_id(value):
    return str(value).replace("torch.", "").replace(" ", "")


def make_cache(generator, batch, group, head_dim, capacities, dtype):
    """Random flat cache with random lengths per sequence; the first sequence fills every segment,
    the last (if another) leaves its first segment empty."""
    kv_heads = len(capacities)
    capacities = torch.tensor(capacities, dtype=torch.int64)
    offsets = torch.cumsum(capacities, 0) - capacities
    total_slots = int(capacities.sum())
    query = torch.randn(batch, kv_heads * group, head_dim, generator=generator).to(dtype)
    keys = torch.randn(batch, total_slots, head_dim, generator=generator).to(dtype)
    values = torch.randn(batch, total_slots, head_dim, generator=generator).to(dtype)
    lengths = (torch.rand(batch, kv_heads, generator=generator) * (capacities + 1)).floor().to(torch.int32)
    lengths[-1, 0] = 0
    lengths[0] = capacities
    return query, keys, values, offsets, capacities, lengths


def sdpa_per_head(query, keys, values, offsets, capacities, lengths, scale):
    """Obviously-correct attention: every (sequence, kv_head) separately, filled slots only."""
    batch, num_q_heads, head_dim = query.shape
    group = num_q_heads // len(capacities)
    output = torch.zeros(batch, num_q_heads, head_dim)
    probs = torch.zeros(batch, keys.shape[1])
    for b in range(batch):
        for kv_head, offset in enumerate(offsets.tolist()):
            length = int(lengths[b, kv_head])
            if length == 0:
                continue
            heads = slice(kv_head * group, (kv_head + 1) * group)
            head_query = query[b, heads].float()[:, None, :]  # (group, 1, head_dim)
            head_keys = keys[b, offset:offset + length].float()  # (length, head_dim)
            head_values = values[b, offset:offset + length].float()
            output[b, heads] = F.scaled_dot_product_attention(
                head_query, head_keys.expand(group, -1, -1), head_values.expand(group, -1, -1), scale=scale
            )[:, 0]
            for q_head_query in query[b, heads].float():
                probs[b, offset:offset + length] += torch.softmax(head_keys @ q_head_query * scale, dim=0)
    return output, probs


@pytest.mark.parametrize("batch, group, head_dim, capacities, num_splits, dtype, return_probs", CASES, ids=case_id)
def test_triton_matches_reference(generator, batch, group, head_dim, capacities, num_splits, dtype, return_probs):
    cache = make_cache(generator, batch, group, head_dim, capacities, dtype)
    lengths = cache[-1]
    expected = decode_attention_reference(*cache, return_probs=return_probs, num_splits=num_splits)
    actual = decode_attention_triton(*cache, return_probs=return_probs, num_splits=num_splits)
    if not return_probs:
        expected, actual = (expected, None), (actual, None)
    atol = TOLERANCE[dtype]
    assert actual[0].dtype == dtype and actual[0].shape == expected[0].shape
    torch.testing.assert_close(actual[0].float(), expected[0].float(), atol=atol, rtol=atol)
    empty = (lengths == 0).repeat_interleave(group, dim=1)  # (batch, num_q_heads)
    assert torch.all(actual[0][empty] == 0)
    if return_probs:
        torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-4)
        offsets, capacities = cache[3], cache[4]
        for kv_head, (offset, capacity) in enumerate(zip(offsets.tolist(), capacities.tolist())):
            head_sum = actual[1][:, offset:offset + capacity].sum(dim=1)
            torch.testing.assert_close(head_sum, group * (lengths[:, kv_head] > 0).float(), atol=1e-4, rtol=0)
            unfilled = torch.arange(capacity) >= lengths[:, kv_head, None]
            assert torch.all(actual[1][:, offset:offset + capacity][unfilled] == 0)


@pytest.mark.parametrize("batch, group, head_dim, capacities, num_splits, dtype, return_probs", CASES, ids=case_id)
def test_reference_matches_sdpa(generator, batch, group, head_dim, capacities, num_splits, dtype, return_probs):
    cache = make_cache(generator, batch, group, head_dim, capacities, dtype)
    scale = 0.3
    output, probs = decode_attention_reference(*cache, scale=scale, return_probs=True, num_splits=num_splits)
    expected_output, expected_probs = sdpa_per_head(*cache, scale=scale)
    atol = TOLERANCE[dtype]
    torch.testing.assert_close(output.float(), expected_output, atol=atol, rtol=atol)
    torch.testing.assert_close(probs, expected_probs, atol=1e-5, rtol=1e-4)


def test_splits_agree_with_each_other(generator):
    cache = make_cache(generator, 2, 3, 64, [130, 1, 57], torch.float32)
    single = decode_attention_triton(*cache, return_probs=True, num_splits=1)
    for num_splits in (2, 5):
        split = decode_attention_triton(*cache, return_probs=True, num_splits=num_splits)
        torch.testing.assert_close(split[0], single[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(split[1], single[1], atol=1e-6, rtol=1e-5)


def test_strided_query_and_slot_gaps(generator):
    """A non-contiguous query, and total_slots larger than the segments: slots past them stay 0."""
    query, keys, values, offsets, capacities, lengths = make_cache(generator, 2, 3, 48, [11, 6], torch.float32)
    query = query.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch stride 48
    keys = torch.cat([keys, torch.randn(2, 5, 48, generator=generator)], dim=1)
    values = torch.cat([values, torch.randn(2, 5, 48, generator=generator)], dim=1)
    expected = decode_attention_reference(query, keys, values, offsets, capacities, lengths, return_probs=True)
    actual = decode_attention_triton(query, keys, values, offsets, capacities, lengths, return_probs=True)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-4)
    assert torch.all(actual[1][:, 17:] == 0)


def test_dispatch(monkeypatch, generator):
    cache = make_cache(generator, 1, 2, 64, [4, 9], torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cache[0])
    torch.testing.assert_close(decode_attention(*cache), decode_attention_triton(*cache))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not use_triton(cache[0])
    torch.testing.assert_close(decode_attention(*cache), decode_attention_reference(*cache))


@pytest.mark.parametrize("implementation", [decode_attention_reference, decode_attention_triton])
def test_shape_errors(generator, implementation):
    query, keys, values, offsets, capacities, lengths = make_cache(generator, 2, 2, 64, [4, 9], torch.float32)
    with pytest.raises(ValueError, match="query"):
        implementation(query[0], keys, values, offsets, capacities, lengths)
    with pytest.raises(ValueError, match="keys and values"):
        implementation(query, keys, values[:, :3], offsets, capacities, lengths)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        implementation(query[:, :3], keys, values, offsets, capacities, lengths)
    with pytest.raises(ValueError, match="lengths"):
        implementation(query, keys, values, offsets, capacities, lengths[:1])
    with pytest.raises(ValueError, match="dtypes"):
        implementation(query.double(), keys, values, offsets, capacities, lengths)
