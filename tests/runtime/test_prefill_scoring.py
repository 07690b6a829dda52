"""SnapKV scoring and the slot gather: the Triton kernels (interpreted) against the PyTorch references,
and the references against loop-by-loop computations that are correct by inspection."""

import pytest
import torch

from kvc.runtime.kernels import prefill_scoring
from kvc.runtime.kernels.prefill_scoring import (
    gather_slots,
    gather_slots_reference,
    gather_slots_triton,
    observation_scores,
    observation_scores_reference,
    observation_scores_triton,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (key_start per sequence, kv_heads, group, window, seq_len, head_dim, pool_kernel, dtype)
SCORING_CASES = [
    ([0], 2, 1, 8, 40, 64, 7, torch.float32),
    ([0, 5, 33], 1, 3, 6, 37, 80, 5, torch.float32),
    ([2, 0, 60], 2, 4, 8, 64, 48, 1, torch.float32),
    ([0, 11, 1], 2, 3, 16, 64, 64, 7, torch.bfloat16),
    ([7], 3, 4, 5, 23, 48, 3, torch.bfloat16),
    ([0, 40], 1, 2, 4, 150, 48, 7, torch.float32),  # several key blocks per query row
    ([0, 9], 2, 3, 50, 50, 48, 1, torch.float32),  # H2O's observation: every prompt query, padding ones too
]

# (batch, seq_len, row width, capacities, dtype)
GATHER_CASES = [
    (1, 30, 64, [5, 0, 1, 12], torch.float32),
    (3, 40, 80, [0, 33, 7], torch.bfloat16),
    (3, 64, 48, [64, 1], torch.float32),
    (2, 30, 32, [5, 0, 1, 12], torch.uint8),  # low-bit rows: the 4-bit codes of 64 channels
    (2, 30, 4, [5, 0, 1, 12], torch.float16),  # and their float16 group parameters
]


def case_id(case):
    return "-".join(str(field).replace("torch.", "").replace(" ", "") for field in case)


def make_prompt(generator, key_start, kv_heads, group, window, seq_len, head_dim, dtype):
    batch = len(key_start)
    query_window = torch.randn(batch, kv_heads * group, window, head_dim, generator=generator).to(dtype)
    keys = torch.randn(batch, kv_heads, seq_len, head_dim, generator=generator).to(dtype)
    return query_window, keys, torch.tensor(key_start)


def loop_scores(query_window, keys, key_start, scale, pool_kernel):
    """SnapKV scores one query at a time over its visible keys, then a literal sliding-window max."""
    batch, num_q_heads, window, _ = query_window.shape
    kv_heads, seq_len = keys.shape[1], keys.shape[2]
    group = num_q_heads // kv_heads
    summed = torch.zeros(batch, kv_heads, seq_len)
    for b in range(batch):
        start = int(key_start[b])
        for q_head in range(num_q_heads):
            for i in range(window):
                position = seq_len - window + i
                if position < start:
                    continue
                visible = keys[b, q_head // group, start:position + 1].float()
                summed[b, q_head // group, start:position + 1] += torch.softmax(
                    visible @ query_window[b, q_head, i].float() * scale, dim=0
                )
    pooled = torch.zeros_like(summed)
    radius = pool_kernel // 2
    for n in range(seq_len):
        pooled[..., n] = summed[..., max(0, n - radius):n + radius + 1].amax(dim=-1)
    for b in range(batch):
        pooled[b, :, :int(key_start[b])] = 0
    return pooled


@pytest.mark.parametrize("case", SCORING_CASES, ids=case_id)
def test_scores_triton_matches_reference(generator, case):
    key_start, kv_heads, group, window, seq_len, head_dim, pool_kernel, dtype = case
    query_window, keys, key_start = make_prompt(generator, key_start, kv_heads, group, window, seq_len, head_dim, dtype)
    expected = observation_scores_reference(query_window, keys, key_start, pool_kernel=pool_kernel)
    actual = observation_scores_triton(query_window, keys, key_start, pool_kernel=pool_kernel)
    assert actual.dtype == torch.float32 and actual.shape == (len(key_start), kv_heads, seq_len)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", SCORING_CASES, ids=case_id)
def test_scores_reference_matches_loops(generator, case):
    key_start, kv_heads, group, window, seq_len, head_dim, pool_kernel, dtype = case
    query_window, keys, key_start = make_prompt(generator, key_start, kv_heads, group, window, seq_len, head_dim, dtype)
    actual = observation_scores_reference(query_window, keys, key_start, scale=0.2, pool_kernel=pool_kernel)
    torch.testing.assert_close(actual, loop_scores(query_window, keys, key_start, 0.2, pool_kernel), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", SCORING_CASES[1:3] + SCORING_CASES[-1:], ids=case_id)
def test_scores_reference_in_query_chunks_matches_loops(generator, case, monkeypatch):
    """The reference bounds memory by taking the window a few queries at a time."""
    monkeypatch.setattr(prefill_scoring, "REFERENCE_QUERY_CHUNK", 5)
    key_start, kv_heads, group, window, seq_len, head_dim, pool_kernel, dtype = case
    query_window, keys, key_start = make_prompt(generator, key_start, kv_heads, group, window, seq_len, head_dim, dtype)
    actual = observation_scores_reference(query_window, keys, key_start, scale=0.2, pool_kernel=pool_kernel)
    torch.testing.assert_close(actual, loop_scores(query_window, keys, key_start, 0.2, pool_kernel), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", [observation_scores_reference, observation_scores_triton])
def test_left_padding_is_masked(generator, implementation):
    """Padding keys may hold anything (here NaN): they score exactly 0, valid keys score > 0,
    and unpooled scores of a sequence sum to group * (window queries that are not padding)."""
    group, window, seq_len = 3, 8, 32
    query_window, keys, key_start = make_prompt(generator, [0, 9, 27], 2, group, window, seq_len, 48, torch.float32)
    clean = implementation(query_window, keys, key_start, pool_kernel=1)
    for b, start in enumerate(key_start.tolist()):
        keys[b, :, :start] = float("nan")
    scores = implementation(query_window, keys, key_start, pool_kernel=1)
    torch.testing.assert_close(scores, clean, atol=1e-6, rtol=1e-5)
    valid = torch.arange(seq_len) >= key_start[:, None, None]  # (batch, 1, seq_len)
    assert torch.all(scores[~valid.expand_as(scores)] == 0)
    assert torch.all(scores[valid.expand_as(scores)] > 0)
    live_queries = (torch.arange(seq_len - window, seq_len) >= key_start[:, None]).sum(dim=1)  # (batch,)
    torch.testing.assert_close(scores.sum(dim=2), (group * live_queries)[:, None].float().expand(-1, 2))
    pooled = implementation(query_window, keys, key_start, pool_kernel=7)
    assert torch.all(pooled[~valid.expand_as(pooled)] == 0)


@pytest.mark.parametrize("implementation", [observation_scores_reference, observation_scores_triton])
def test_scoring_errors(generator, implementation):
    query_window, keys, key_start = make_prompt(generator, [0, 3], 2, 2, 4, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="pool_kernel"):
        implementation(query_window, keys, key_start, pool_kernel=4)
    with pytest.raises(ValueError, match="key_start"):
        implementation(query_window, keys, key_start[:1])
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        implementation(query_window[:, :3], keys, key_start)
    with pytest.raises(ValueError, match="window"):
        implementation(query_window, keys[:, :, :3], key_start)


def make_selection(generator, batch, seq_len, width, capacities, dtype):
    """Prompt rows and, per (sequence, kv_head), the prompt position of every slot (-1 for about a
    third of them: empty slots)."""
    kv_heads = len(capacities)
    segments = [(sum(capacities[:head]), capacities[head]) for head in range(kv_heads)]
    source = random_rows(generator, (batch, kv_heads, seq_len, width), dtype)
    index = torch.randint(0, seq_len, (batch, kv_heads, max(capacities)), generator=generator)
    index[torch.rand(index.shape, generator=generator) < 0.3] = -1
    return source, index, segments


def random_rows(generator, shape, dtype):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def sentinel_buffer(batch, total_slots, width, dtype):
    return torch.full((batch, total_slots, width), -7 if dtype.is_floating_point else 251, dtype=dtype)


@pytest.mark.parametrize("case", GATHER_CASES, ids=case_id)
def test_gather_triton_matches_reference(generator, case):
    batch, seq_len, width, capacities, dtype = case
    source, index, segments = make_selection(generator, *case)
    expected, actual = (sentinel_buffer(batch, sum(capacities), width, dtype) for _ in range(2))
    gather_slots_reference(source, index, segments, expected)
    gather_slots_triton(source, index, segments, actual)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("case", [*GATHER_CASES, (2, 9, 16, [0, 0], torch.float32)], ids=case_id)
@pytest.mark.parametrize("implementation", [gather_slots_reference, gather_slots_triton])
def test_gather_without_a_buffer_returns_the_rows_the_buffer_would_hold(generator, case, implementation):
    """A prefill that quantises only the kept rows gathers them into a new tensor first."""
    batch, seq_len, width, capacities, dtype = case
    source, index, segments = make_selection(generator, *case)
    expected = sentinel_buffer(batch, sum(capacities), width, dtype)
    gather_slots_reference(source, index, segments, expected)
    returned = implementation(source, index, segments)
    assert returned.shape == expected.shape and returned.dtype == dtype and torch.equal(returned, expected)


@pytest.mark.parametrize("implementation", [gather_slots_reference, gather_slots_triton])
def test_gather_without_a_buffer_needs_segments_in_head_order(generator, implementation):
    source, index, _ = make_selection(generator, 2, 20, 48, [6, 3], torch.float32)
    with pytest.raises(ValueError, match="do not tile a buffer in head order"):
        implementation(source, index, [(3, 6), (0, 3)])
    with pytest.raises(ValueError, match="do not tile a buffer in head order"):
        implementation(source, index, [(0, 6), (7, 3)])


@pytest.mark.parametrize("case", GATHER_CASES, ids=case_id)
def test_gather_reference_matches_a_loop(generator, case):
    batch, seq_len, width, capacities, dtype = case
    source, index, segments = make_selection(generator, *case)
    out = sentinel_buffer(batch, sum(capacities), width, dtype)
    gather_slots_reference(source, index, segments, out)
    for b in range(batch):
        for kv_head, (offset, capacity) in enumerate(segments):
            for slot in range(capacity):
                position = int(index[b, kv_head, slot])
                expected = source[b, kv_head, position] if position >= 0 else torch.zeros(width, dtype=dtype)
                assert torch.equal(out[b, offset + slot], expected)


def test_dispatch(monkeypatch, generator):
    source, index, segments = make_selection(generator, 2, 20, 48, [6, 3], torch.float32)
    query_window, keys, key_start = make_prompt(generator, [0, 4], 2, 2, 4, 20, 48, torch.float32)
    for interpret in ("1", None):
        if interpret is None:
            monkeypatch.delenv("TRITON_INTERPRET")
        else:
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
        scores = observation_scores_triton if interpret else observation_scores_reference
        gather = gather_slots_triton if interpret else gather_slots_reference
        torch.testing.assert_close(
            observation_scores(query_window, keys, key_start), scores(query_window, keys, key_start)
        )
        dispatched, direct = sentinel_buffer(2, 9, 48, torch.float32), sentinel_buffer(2, 9, 48, torch.float32)
        gather_slots(source, index, segments, dispatched)
        gather(source, index, segments, direct)
        assert torch.equal(dispatched, direct)


@pytest.mark.parametrize("implementation", [gather_slots_reference, gather_slots_triton])
def test_gather_errors(generator, implementation):
    source, index, segments = make_selection(generator, 2, 20, 48, [6, 3], torch.float32)
    out = sentinel_buffer(2, 9, 48, torch.float32)
    with pytest.raises(ValueError, match="total_slots"):
        implementation(source, index, segments, out[:, :8])
    with pytest.raises(ValueError, match="does not fit"):
        implementation(source, index, segments, out.to(torch.float16))
    with pytest.raises(ValueError, match="segments"):
        implementation(source, index, segments[:1], out)
