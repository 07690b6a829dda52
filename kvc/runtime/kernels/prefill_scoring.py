"""Prefill-time SnapKV scoring and the gather of the kept keys into the flat compressed cache.

Scoring: the last `window` prompt queries attend causally to the prompt; each key's softmax
probability is summed over the window and the GQA group, then max-pooled along the sequence.
Two Triton passes: per-query log-sum-exp over key blocks, then per key block the summed exp(s - lse).
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvc.runtime.kernels.decode_attention import block_rows, dot_precision, use_triton

REFERENCE_QUERY_CHUNK = 256  # window queries per step of the reference


@triton.jit
def _window_lse_kernel(
    query_ptr, keys_ptr, key_start_ptr, lse_ptr,
    scale_log2, seq_len, window, head_dim,
    stride_query_batch, stride_query_head, stride_query_window, stride_query_dim,
    stride_keys_batch, stride_keys_head, stride_keys_seq, stride_keys_dim,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (row block, kv_head, batch); row r is (group member r // window, query r % window)."""
    row_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < GROUP * window
    dim_mask = dims < head_dim
    q_heads = kv_head * GROUP + rows // window
    window_index = rows % window
    positions = seq_len - window + window_index
    key_start = tl.load(key_start_ptr + batch)

    query = tl.load(
        query_ptr + batch.to(tl.int64) * stride_query_batch + q_heads[:, None] * stride_query_head
        + window_index[:, None] * stride_query_window + dims[None, :] * stride_query_dim,
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    ).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    keys_base = keys_ptr + batch.to(tl.int64) * stride_keys_batch + kv_head.to(tl.int64) * stride_keys_head

    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    for block_start in range(key_start, seq_len, BLOCK_N):
        key_positions = block_start + tl.arange(0, BLOCK_N)
        key_mask = key_positions < seq_len
        keys = tl.load(
            keys_base + key_positions[:, None] * stride_keys_seq + dims[None, :] * stride_keys_dim,
            mask=key_mask[:, None] & dim_mask[None, :], other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        causal = key_mask[None, :] & (key_positions[None, :] <= positions[:, None])
        scores = tl.where(causal, scores, float("-inf"))
        # Rows that have seen no visible key yet keep max -inf: shift them by 0 to avoid NaN.
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(tl.exp2(scores - shift[:, None]), axis=1)
        running_max = new_max

    # A query in the left padding sees no valid key; its probabilities are masked out in pass two.
    safe_sum = tl.where(running_sum > 0.0, running_sum, 1.0)
    lse_log2 = tl.where(running_sum > 0.0, running_max + tl.log2(safe_sum), 0.0)
    tl.store(lse_ptr + (batch * num_q_heads + q_heads) * window + window_index, lse_log2, mask=row_mask)


@triton.jit
def _window_scores_kernel(
    query_ptr, keys_ptr, key_start_ptr, lse_ptr, scores_ptr,
    scale_log2, seq_len, window, head_dim,
    stride_query_batch, stride_query_head, stride_query_window, stride_query_dim,
    stride_keys_batch, stride_keys_head, stride_keys_seq, stride_keys_dim,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (key block, kv_head, batch): probabilities summed over all rows of the group."""
    key_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    key_positions = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_start = tl.load(key_start_ptr + batch)
    key_mask = (key_positions >= key_start) & (key_positions < seq_len)

    keys = tl.load(
        keys_ptr + batch.to(tl.int64) * stride_keys_batch + kv_head.to(tl.int64) * stride_keys_head
        + key_positions[:, None] * stride_keys_seq + dims[None, :] * stride_keys_dim,
        mask=key_mask[:, None] & dim_mask[None, :], other=0.0,
    ).to(tl.float32)  # (BLOCK_N, BLOCK_D)

    total = tl.zeros((BLOCK_N,), tl.float32)
    for row_start in range(0, GROUP * window, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < GROUP * window
        q_heads = kv_head * GROUP + rows // window
        window_index = rows % window
        positions = seq_len - window + window_index
        query = tl.load(
            query_ptr + batch.to(tl.int64) * stride_query_batch + q_heads[:, None] * stride_query_head
            + window_index[:, None] * stride_query_window + dims[None, :] * stride_query_dim,
            mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
        ).to(tl.float32)  # (BLOCK_M, BLOCK_D)
        lse_log2 = tl.load(
            lse_ptr + (batch * num_q_heads + q_heads) * window + window_index, mask=row_mask, other=0.0
        )
        scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        visible = row_mask[:, None] & key_mask[None, :] & (key_positions[None, :] <= positions[:, None])
        total += tl.sum(tl.where(visible, tl.exp2(scores - lse_log2[:, None]), 0.0), axis=0)

    tl.store(
        scores_ptr + ((batch * tl.num_programs(1) + kv_head) * seq_len + key_positions).to(tl.int64),
        total, mask=key_positions < seq_len,
    )


def _check_scoring_inputs(query_window, keys, key_start, pool_kernel):
    """Raise ValueError unless the shapes fit; return the GQA group size."""
    if query_window.dim() != 4 or keys.dim() != 4:
        raise ValueError(
            "query_window must be (batch, num_q_heads, window, head_dim) and keys (batch, kv_heads, "
            f"seq_len, head_dim), got {tuple(query_window.shape)} and {tuple(keys.shape)}"
        )
    batch, num_q_heads, window, head_dim = query_window.shape
    _, kv_heads, seq_len, _ = keys.shape
    if keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise ValueError(f"keys {tuple(keys.shape)} do not match query_window {tuple(query_window.shape)}")
    if query_window.dtype != keys.dtype:
        raise ValueError(f"query_window and keys dtypes differ: {query_window.dtype}, {keys.dtype}")
    if num_q_heads % kv_heads != 0:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of kv_heads={kv_heads}")
    if not 1 <= window <= seq_len:
        raise ValueError(f"window={window} must be in [1, seq_len={seq_len}]")
    if key_start.shape != (batch,):
        raise ValueError(f"key_start must be (batch,) = {(batch,)}, got {tuple(key_start.shape)}")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be a positive odd integer, got {pool_kernel}")
    return num_q_heads // kv_heads


def _pool_and_mask_padding(scores, key_start, pool_kernel):
    """Max-pool (batch, kv_heads, seq_len) scores along seq_len, then zero the left padding again."""
    pooled = F.max_pool1d(scores, kernel_size=pool_kernel, stride=1, padding=pool_kernel // 2)
    padding = torch.arange(scores.shape[2], device=scores.device) < key_start[:, None, None]
    return pooled.masked_fill(padding, 0.0)


def observation_scores_reference(query_window, keys, key_start, scale=None, pool_kernel=7):
    """Dense PyTorch SnapKV scores: (batch, kv_heads, seq_len) float32, exactly 0 at padding positions."""
    group = _check_scoring_inputs(query_window, keys, key_start, pool_kernel)
    batch, _, window, head_dim = query_window.shape
    kv_heads, seq_len = keys.shape[1], keys.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    key_start = key_start.to(keys.device)

    grouped_query = query_window.float().reshape(batch, kv_heads, group, window, head_dim)
    keys = keys.float()
    key_positions = torch.arange(seq_len, device=keys.device)
    total = torch.zeros(batch, kv_heads, seq_len, dtype=torch.float32, device=keys.device)
    for first in range(0, window, REFERENCE_QUERY_CHUNK):  # a long window (H2O's: every query) in bounded memory
        chunk = grouped_query[:, :, :, first:first + REFERENCE_QUERY_CHUNK]
        scores = torch.einsum("bhgwd,bhnd->bhgwn", chunk, keys) * scale
        query_positions = seq_len - window + first + torch.arange(chunk.shape[3], device=keys.device)
        causal = key_positions[None, :] <= query_positions[:, None]  # (chunk, seq_len)
        visible = (causal[None] & (key_positions >= key_start[:, None, None]))[:, None, None]  # (batch, 1, 1, chunk, seq_len)
        # Window queries inside the padding see no key: their all -inf rows give NaN, replaced by 0.
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        total += probs.sum(dim=(2, 3))
    return _pool_and_mask_padding(total, key_start, pool_kernel)


def observation_scores_triton(query_window, keys, key_start, scale=None, pool_kernel=7):
    """Triton SnapKV scores: log-sum-exp pass, summed-probability pass, then torch max-pool."""
    group = _check_scoring_inputs(query_window, keys, key_start, pool_kernel)
    batch, num_q_heads, window, head_dim = query_window.shape
    kv_heads, seq_len = keys.shape[1], keys.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    scale_log2 = scale * math.log2(math.e)
    device = keys.device
    key_start = key_start.to(device)

    rows = group * window
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = block_rows(block_d, keys.dtype)
    block_m = min(block_n, max(16, triton.next_power_of_2(rows)))
    strides = (*query_window.stride(), *keys.stride())

    lse_log2 = torch.empty(batch, num_q_heads, window, dtype=torch.float32, device=device)
    _window_lse_kernel[(triton.cdiv(rows, block_m), kv_heads, batch)](
        query_window, keys, key_start, lse_log2,
        scale_log2, seq_len, window, head_dim, *strides,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(keys.dtype),
    )
    scores = torch.empty(batch, kv_heads, seq_len, dtype=torch.float32, device=device)
    _window_scores_kernel[(triton.cdiv(seq_len, block_n), kv_heads, batch)](
        query_window, keys, key_start, lse_log2, scores,
        scale_log2, seq_len, window, head_dim, *strides,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(keys.dtype),
    )
    return _pool_and_mask_padding(scores, key_start, pool_kernel)


def observation_scores(query_window, keys, key_start, scale=None, pool_kernel=7):
    """SnapKV observation-window scores.

    query_window (batch, num_q_heads, window, head_dim): the last prompt queries; keys (batch,
    kv_heads, seq_len, head_dim); key_start (batch,) first non-padding position. Returns
    (batch, kv_heads, seq_len) float32: causal softmax summed over window and group, max-pooled
    with odd pool_kernel (1 = none). Padding positions are exactly 0; valid keys score > 0 unless
    their probability underflows float32, so selections should still mask positions < key_start.
    """
    implementation = observation_scores_triton if use_triton(keys) else observation_scores_reference
    return implementation(query_window, keys, key_start, scale, pool_kernel)


@triton.jit
def _gather_kernel(
    keys_ptr, values_ptr, indices_ptr, counts_ptr, offsets_ptr, out_keys_ptr, out_values_ptr,
    head_dim,
    stride_keys_batch, stride_keys_head, stride_keys_seq, stride_keys_dim,
    stride_values_batch, stride_values_head, stride_values_seq, stride_values_dim,
    stride_indices_batch, stride_indices_head, stride_indices_slot,
    stride_counts_batch, stride_counts_head,
    stride_out_keys_batch, stride_out_keys_slot, stride_out_keys_dim,
    stride_out_values_batch, stride_out_values_slot, stride_out_values_dim,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (slot block, kv_head, batch): copy the kept rows into the head's segment."""
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)

    count = tl.load(counts_ptr + batch * stride_counts_batch + kv_head * stride_counts_head)
    offset = tl.load(offsets_ptr + kv_head).to(tl.int64)
    slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    slot_mask = slots < count
    tile_mask = slot_mask[:, None] & (dims[None, :] < head_dim)

    positions = tl.load(
        indices_ptr + batch * stride_indices_batch + kv_head * stride_indices_head + slots * stride_indices_slot,
        mask=slot_mask, other=0,
    )
    keys = tl.load(
        keys_ptr + batch * stride_keys_batch + kv_head * stride_keys_head
        + positions[:, None] * stride_keys_seq + dims[None, :] * stride_keys_dim,
        mask=tile_mask,
    )  # (BLOCK_N, BLOCK_D)
    values = tl.load(
        values_ptr + batch * stride_values_batch + kv_head * stride_values_head
        + positions[:, None] * stride_values_seq + dims[None, :] * stride_values_dim,
        mask=tile_mask,
    )  # (BLOCK_N, BLOCK_D)
    tl.store(
        out_keys_ptr + batch * stride_out_keys_batch + (offset + slots[:, None]) * stride_out_keys_slot
        + dims[None, :] * stride_out_keys_dim,
        keys.to(out_keys_ptr.dtype.element_ty), mask=tile_mask,
    )
    tl.store(
        out_values_ptr + batch * stride_out_values_batch + (offset + slots[:, None]) * stride_out_values_slot
        + dims[None, :] * stride_out_values_dim,
        values.to(out_values_ptr.dtype.element_ty), mask=tile_mask,
    )


def _check_gather_inputs(keys, values, indices, counts, offsets, capacities, out_keys, out_values):
    """Raise ValueError unless shapes fit and every count and kept index is in range (syncs once)."""
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            "keys and values must both be (batch, kv_heads, seq_len, head_dim), "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    batch, kv_heads, seq_len, head_dim = keys.shape
    if indices.dim() != 3 or indices.shape[:2] != (batch, kv_heads) or indices.dtype != torch.int64:
        raise ValueError(
            f"indices must be int64 (batch, kv_heads, max_capacity) with batch={batch}, kv_heads={kv_heads}, "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    if counts.shape != (batch, kv_heads):
        raise ValueError(f"counts must be (batch, kv_heads) = {(batch, kv_heads)}, got {tuple(counts.shape)}")
    if offsets.shape != (kv_heads,) or capacities.shape != (kv_heads,):
        raise ValueError(
            f"offsets and capacities must both be (kv_heads,) = ({kv_heads},), "
            f"got {tuple(offsets.shape)} and {tuple(capacities.shape)}"
        )
    if out_keys.dim() != 3 or out_keys.shape != out_values.shape:
        raise ValueError(
            "out_keys and out_values must both be (batch, total_slots, head_dim), "
            f"got {tuple(out_keys.shape)} and {tuple(out_values.shape)}"
        )
    if out_keys.shape[0] != batch or out_keys.shape[2] != head_dim:
        raise ValueError(f"out_keys {tuple(out_keys.shape)} do not match keys {tuple(keys.shape)}")
    capacities = capacities.to(counts.device)
    if bool((offsets.to(capacities.device) + capacities > out_keys.shape[1]).any()):
        raise ValueError(f"a segment ends beyond total_slots={out_keys.shape[1]}")
    if bool(((counts < 0) | (counts > capacities) | (counts > indices.shape[2])).any()):
        raise ValueError("counts must lie in [0, min(capacities[h], indices.shape[2])]")
    kept = torch.arange(indices.shape[2], device=indices.device) < counts.to(indices.device)[..., None]
    if bool((kept & ((indices < 0) | (indices >= seq_len))).any()):
        raise ValueError(f"kept indices must lie in [0, seq_len={seq_len})")


def gather_into_segments_reference(keys, values, indices, counts, offsets, capacities, out_keys, out_values):
    """Plain-PyTorch gather: out[b, offsets[h] + j] = source[b, h, indices[b, h, j]] for j < counts[b, h]."""
    _check_gather_inputs(keys, values, indices, counts, offsets, capacities, out_keys, out_values)
    batch, kv_heads = counts.shape
    for b in range(batch):
        for kv_head in range(kv_heads):
            offset, count = int(offsets[kv_head]), int(counts[b, kv_head])
            positions = indices[b, kv_head, :count]
            out_keys[b, offset:offset + count] = keys[b, kv_head, positions]
            out_values[b, offset:offset + count] = values[b, kv_head, positions]


def gather_into_segments_triton(keys, values, indices, counts, offsets, capacities, out_keys, out_values):
    """Triton gather of the kept rows of every (batch, kv_head) into the flat out buffers, in place."""
    _check_gather_inputs(keys, values, indices, counts, offsets, capacities, out_keys, out_values)
    batch, kv_heads, _, head_dim = keys.shape
    counts = counts.to(keys.device)
    offsets = offsets.to(keys.device)
    block_n = 32
    _gather_kernel[(max(1, triton.cdiv(indices.shape[2], block_n)), kv_heads, batch)](
        keys, values, indices, counts, offsets, out_keys, out_values,
        head_dim,
        *keys.stride(), *values.stride(), *indices.stride(), *counts.stride(),
        *out_keys.stride(), *out_values.stride(),
        BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
    )


def gather_into_segments(keys, values, indices, counts, offsets, capacities, out_keys, out_values):
    """Write the kept prompt rows of each KV head into its segment of the flat cache (in place).

    keys, values (batch, kv_heads, seq_len, head_dim); indices int64 (batch, kv_heads, max_capacity),
    of which the first counts[b, h] <= capacities[h] are kept; out_keys, out_values (batch,
    total_slots, head_dim), head h owning slots [offsets[h], offsets[h] + capacities[h]).
    """
    implementation = gather_into_segments_triton if use_triton(keys) else gather_into_segments_reference
    implementation(keys, values, indices, counts, offsets, capacities, out_keys, out_values)
