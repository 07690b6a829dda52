"""Prefill-time SnapKV scoring and the gather of the kept keys into the flat compressed cache.

Scoring: the last `window` prompt queries attend causally to the prompt; each key's softmax
probability is summed over the window and the GQA group (or, in the reference, maximised: a probe's
score), then max-pooled along the sequence.
Two Triton passes: per-query log-sum-exp over key blocks, then per key block the summed exp(s - lse).
"""

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvc.runtime.kernels.slot_attention import block_rows, dot_precision, use_triton

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


def pool_scores(scores, key_start, pool_kernel):
    """Max-pool (batch, kv_heads, seq_len) scores along seq_len, then zero the left padding again."""
    # max_pool1d(kernel, stride 1, same padding) as the maximum of shifted copies: the same numbers, and
    # unlike max_pool1d it keeps the prompt length symbolic when the prefill is exported.
    half, length = pool_kernel // 2, scores.shape[2]
    padded = F.pad(scores, (half, half), value=float("-inf"))
    pooled = torch.stack([padded[..., shift:shift + length] for shift in range(pool_kernel)]).amax(0)
    padding = torch.arange(scores.shape[2], device=scores.device) < key_start[:, None, None]
    return pooled.masked_fill(padding, 0.0)


def observation_scores_reference(query_window, keys, key_start, scale=None, pool_kernel=7, reduce="sum"):
    """Dense PyTorch SnapKV scores: (batch, kv_heads, seq_len) float32, exactly 0 at padding positions.

    reduce="max" takes each key's largest probability over the window and the group instead of the sum
    (KVzip's score of a context by the queries of a probe after it)."""
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
        total = total + probs.sum(dim=(2, 3)) if reduce == "sum" else torch.maximum(total, probs.amax(dim=(2, 3)))
    return pool_scores(total, key_start, pool_kernel)


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
    block_n = block_rows(block_d, keys.element_size())
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
    return pool_scores(scores, key_start, pool_kernel)


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
    source_ptr, index_ptr, table_ptr, out_ptr, width, table_width,
    stride_source_batch, stride_source_head, stride_source_seq,
    stride_index_batch, stride_index_head, stride_out_batch, stride_out_slot,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program per (slot block, kv_head, batch): each slot of the head takes its source row, or zeros."""
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    offset = tl.load(table_ptr + kv_head * table_width).to(tl.int64)
    capacity = tl.load(table_ptr + kv_head * table_width + 1)
    slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
    columns = tl.arange(0, BLOCK_W)
    in_segment = slots < capacity
    index = tl.load(index_ptr + batch * stride_index_batch + kv_head * stride_index_head + slots,
                    mask=in_segment, other=-1)
    filled = index >= 0
    column_mask = columns[None, :] < width
    rows = tl.load(
        source_ptr + batch * stride_source_batch + kv_head * stride_source_head
        + tl.maximum(index, 0)[:, None] * stride_source_seq + columns[None, :],
        mask=filled[:, None] & column_mask, other=0,
    )
    tl.store(out_ptr + batch * stride_out_batch + (offset + slots[:, None]) * stride_out_slot + columns[None, :],
             rows, mask=in_segment[:, None] & column_mask)


def _check_gather_inputs(source, index, segments, out):
    """Shapes that fit; without `out`, segments that tile (batch, total_slots) in head order."""
    if out is None:
        filled = [(offset, capacity) for offset, capacity in segments if capacity]
        if [offset for offset, _ in filled] != [sum(c for _, c in filled[:i]) for i in range(len(filled))]:
            raise ValueError(f"segments {segments} do not tile a buffer in head order; pass `out`")
    shape = tuple(out.shape) if out is not None else (*source.shape[:1], sum(c for _, c in segments), *source.shape[3:])
    if source.dim() != 4 or len(shape) != 3 or index.dim() != 3:
        raise ValueError("source must be (batch, kv_heads, seq_len, width), index (batch, kv_heads, slots) and "
                         f"out (batch, total_slots, width), got {tuple(source.shape)}, {tuple(index.shape)}, {shape}")
    if (source.shape[0], source.shape[3]) != (shape[0], shape[2]) or (out is not None and source.dtype != out.dtype):
        raise ValueError(f"source {tuple(source.shape)} {source.dtype} does not fit out {shape} "
                         f"{source.dtype if out is None else out.dtype}")
    if index.shape[:2] != source.shape[:2] or len(segments) != source.shape[1]:
        raise ValueError(f"index {tuple(index.shape)} and {len(segments)} segments do not match source "
                         f"{tuple(source.shape)}")
    if any(offset + capacity > shape[1] or capacity > index.shape[2] for offset, capacity in segments):
        raise ValueError(f"a segment ends beyond total_slots={shape[1]} or the index's {index.shape[2]} slots")


def gather_slots_reference(source, index, segments, out=None, table=None):
    """Plain-PyTorch gather: out[b, offset_h + j] = source[b, h, index[b, h, j]], zeros where index < 0.

    Every head's rows in one gather, up to the longest segment, then one copy per head: a traced
    prefill (an exported graph, a compiled one) holds a few operations per head, not a dozen. Without
    `out`, the heads' rows are concatenated into a new tensor (no buffer made first: in a traced
    graph, nothing computed from constants alone) and returned."""
    _check_gather_inputs(source, index, segments, out)
    longest = max((capacity for _, capacity in segments), default=0)
    slot_index = index[..., :longest]  # (batch, kv_heads, longest)
    rows = source.gather(2, slot_index.clamp(min=0)[..., None].expand(-1, -1, -1, source.shape[3]))
    rows = torch.where(slot_index[..., None] >= 0, rows, torch.zeros_like(rows))
    if out is None:
        parts = [rows[:, kv_head, :capacity] for kv_head, (_, capacity) in enumerate(segments) if capacity]
        return torch.cat(parts, 1) if parts else rows.flatten(1, 2)
    for kv_head, (offset, capacity) in enumerate(segments):
        out[:, offset:offset + capacity] = rows[:, kv_head, :capacity]
    return out


def gather_slots_triton(source, index, segments, out=None, table=None):
    """Triton gather of every (batch, kv_head)'s slot rows into the flat out buffer, in place (or a new
    one, returned)."""
    _check_gather_inputs(source, index, segments, out)
    if out is None:
        out = source.new_empty(source.shape[0], sum(capacity for _, capacity in segments), source.shape[3])
    assert source.stride(3) == 1 and out.stride(2) == 1 and index.stride(2) == 1
    if table is None:
        table = torch.tensor(segments, dtype=torch.int32, device=out.device).reshape(len(segments), 2)
    block_n = 32
    max_capacity = max((capacity for _, capacity in segments), default=0)
    _gather_kernel[(max(1, triton.cdiv(max_capacity, block_n)), len(segments), out.shape[0])](
        source, index, table, out, source.shape[3], table.shape[1],
        *source.stride()[:3], *index.stride()[:2], *out.stride()[:2],
        BLOCK_N=block_n, BLOCK_W=max(16, triton.next_power_of_2(source.shape[3])),
    )
    return out


def gather_slots(source, index, segments, out=None, table=None):
    """Write each KV head's slots of the flat cache from the prompt's rows (in place), and return them.

    source (batch, kv_heads, seq_len, width) rows of any dtype; index (batch, kv_heads, >= capacity)
    int64: the prompt position each slot takes, -1 for a slot left empty (zeroed); segments: per KV
    head (offset, capacity); out (batch, total_slots, width), or None for a new tensor (the segments
    then tile it in head order); table: the segments on the device.
    """
    implementation = gather_slots_triton if use_triton(source) else gather_slots_reference
    return implementation(source, index, segments, out, table)
