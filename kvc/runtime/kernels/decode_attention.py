"""Ragged per-head decode attention over the flat compressed KV cache.

Each KV head reads only the filled prefix of its own segment; all query heads of its GQA group
share one pass over K/V (flash-decoding split-K, online softmax in float32), and a log-sum-exp
merge combines the splits. Optionally returns per-slot probabilities summed over the group.
"""

import math
import os

import torch
import triton
import triton.language as tl

# Automatic split count: keep at least this many key blocks per split, and at most MAX_SPLITS splits.
MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 128


def dot_precision(dtype):
    """tl.dot precision for operands upcast from dtype to float32.

    tf32 holds bf16/fp16 values exactly, so 16-bit inputs lose nothing; float32 inputs need ieee.
    (Dotting the 16-bit operands directly is not an option: the interpreter multiplies raw bf16 bits.)
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def block_rows(block_d, dtype):
    """Rows of a (rows, block_d) K/V tile: 16..64, at most 16 KiB per tile, which keeps every kernel
    here below the 99 KiB of shared memory of the smallest GPUs since Ampere (checked for sm_89/sm_90)."""
    return min(64, max(16, 16384 // (block_d * dtype.itemsize)))


def use_triton(tensor):
    """Triton runs on CUDA tensors, or anywhere under the Triton interpreter (TRITON_INTERPRET=1)."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _decode_split_kernel(
    query_ptr, keys_ptr, values_ptr, offsets_ptr, lengths_ptr,
    partial_max_ptr, partial_sum_ptr, partial_out_ptr,
    scale_log2, head_dim, num_splits,
    stride_query_batch, stride_query_head, stride_query_dim,
    stride_keys_batch, stride_keys_slot, stride_keys_dim,
    stride_values_batch, stride_values_slot, stride_values_dim,
    stride_lengths_batch, stride_lengths_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (split, kv_head, batch): partial softmax statistics of the whole group."""
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < GROUP
    dim_mask = dims < head_dim
    q_heads = kv_head * GROUP + rows

    query = tl.load(
        query_ptr + batch * stride_query_batch + q_heads[:, None] * stride_query_head
        + dims[None, :] * stride_query_dim,
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    ).to(tl.float32)  # (GROUP_PAD, BLOCK_D)

    offset = tl.load(offsets_ptr + kv_head).to(tl.int64)
    length = tl.load(lengths_ptr + batch * stride_lengths_batch + kv_head * stride_lengths_head)
    chunk = tl.cdiv(length, num_splits)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    keys_base = keys_ptr + batch.to(tl.int64) * stride_keys_batch + offset * stride_keys_slot
    values_base = values_ptr + batch.to(tl.int64) * stride_values_batch + offset * stride_values_slot

    running_max = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), tl.float32)
    for block_start in range(start, end, BLOCK_N):
        slots = block_start + tl.arange(0, BLOCK_N)
        slot_mask = slots < end
        tile_mask = slot_mask[:, None] & dim_mask[None, :]
        keys = tl.load(
            keys_base + slots[:, None] * stride_keys_slot + dims[None, :] * stride_keys_dim,
            mask=tile_mask, other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(slot_mask[None, :], scores, float("-inf"))  # (GROUP_PAD, BLOCK_N)
        # Every block holds at least one filled slot, so new_max is finite.
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        alpha = tl.exp2(running_max - new_max)
        weights = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * alpha + tl.sum(weights, axis=1)
        values = tl.load(
            values_base + slots[:, None] * stride_values_slot + dims[None, :] * stride_values_dim,
            mask=tile_mask, other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(weights, values, input_precision=DOT_PRECISION)
        running_max = new_max

    # Partials are laid out (batch, num_q_heads, num_splits[, BLOCK_D]).
    stat_index = (batch * num_q_heads + q_heads) * num_splits + split
    tl.store(partial_max_ptr + stat_index, running_max, mask=row_mask)
    tl.store(partial_sum_ptr + stat_index, running_sum, mask=row_mask)
    tl.store(partial_out_ptr + stat_index[:, None] * BLOCK_D + dims[None, :], acc, mask=row_mask[:, None])


@triton.jit
def _decode_merge_kernel(
    partial_max_ptr, partial_sum_ptr, partial_out_ptr, output_ptr, lse_ptr,
    head_dim, num_splits,
    stride_output_batch, stride_output_head, stride_output_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (q_head, batch): log-sum-exp merge of the splits, normalised output."""
    q_head = tl.program_id(0)
    batch = tl.program_id(1)
    num_q_heads = tl.num_programs(0)

    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    stat_index = (batch * num_q_heads + q_head) * num_splits + splits

    split_max = tl.load(partial_max_ptr + stat_index, mask=split_mask, other=float("-inf"))
    split_sum = tl.load(partial_sum_ptr + stat_index, mask=split_mask, other=0.0)
    split_out = tl.load(
        partial_out_ptr + stat_index[:, None] * BLOCK_D + dims[None, :],
        mask=split_mask[:, None], other=0.0,
    )  # (BLOCK_S, BLOCK_D)

    # An empty head has max -inf in every split: shift by 0 instead so nothing becomes NaN.
    global_max = tl.max(split_max, axis=0)
    shift = tl.where(global_max == float("-inf"), 0.0, global_max)
    split_weight = tl.exp2(split_max - shift)
    denominator = tl.sum(split_weight * split_sum, axis=0)
    safe_denominator = tl.where(denominator > 0.0, denominator, 1.0)
    output = tl.sum(split_weight[:, None] * split_out, axis=0) / safe_denominator  # (BLOCK_D,)
    lse_log2 = tl.where(denominator > 0.0, shift + tl.log2(safe_denominator), 0.0)

    tl.store(
        output_ptr + batch * stride_output_batch + q_head * stride_output_head + dims * stride_output_dim,
        output.to(output_ptr.dtype.element_ty), mask=dims < head_dim,
    )
    tl.store(lse_ptr + batch * num_q_heads + q_head, lse_log2)


@triton.jit
def _decode_probs_kernel(
    query_ptr, keys_ptr, offsets_ptr, lengths_ptr, lse_ptr, probs_ptr,
    scale_log2, head_dim,
    stride_query_batch, stride_query_head, stride_query_dim,
    stride_keys_batch, stride_keys_slot, stride_keys_dim,
    stride_lengths_batch, stride_lengths_head,
    stride_probs_batch, stride_probs_slot,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (slot block, kv_head, batch): exact probabilities summed over the group."""
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < GROUP
    dim_mask = dims < head_dim
    q_heads = kv_head * GROUP + rows

    offset = tl.load(offsets_ptr + kv_head).to(tl.int64)
    length = tl.load(lengths_ptr + batch * stride_lengths_batch + kv_head * stride_lengths_head)
    slots = block * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_mask = slots < length

    query = tl.load(
        query_ptr + batch * stride_query_batch + q_heads[:, None] * stride_query_head
        + dims[None, :] * stride_query_dim,
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    ).to(tl.float32)  # (GROUP_PAD, BLOCK_D)
    keys = tl.load(
        keys_ptr + batch.to(tl.int64) * stride_keys_batch + (offset + slots[:, None]) * stride_keys_slot
        + dims[None, :] * stride_keys_dim,
        mask=slot_mask[:, None] & dim_mask[None, :], other=0.0,
    ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
    lse_log2 = tl.load(lse_ptr + batch * num_q_heads + q_heads, mask=row_mask, other=0.0)

    scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale_log2  # (GROUP_PAD, BLOCK_N)
    probs = tl.exp2(scores - lse_log2[:, None])
    probs = tl.where(row_mask[:, None] & slot_mask[None, :], probs, 0.0)
    tl.store(
        probs_ptr + batch.to(tl.int64) * stride_probs_batch + (offset + slots) * stride_probs_slot,
        tl.sum(probs, axis=0), mask=slot_mask,
    )


def _check_decode_inputs(query, keys, values, offsets, capacities, lengths):
    """Raise ValueError unless the tensors follow the flat-cache layout; return the GQA group size."""
    if query.dim() != 3:
        raise ValueError(f"query must be (batch, num_q_heads, head_dim), got shape {tuple(query.shape)}")
    if keys.dim() != 3 or keys.shape != values.shape:
        raise ValueError(
            "keys and values must both be (batch, total_slots, head_dim), "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    batch, num_q_heads, head_dim = query.shape
    if keys.shape[0] != batch or keys.shape[2] != head_dim:
        raise ValueError(
            f"keys {tuple(keys.shape)} do not match query {tuple(query.shape)} in batch or head_dim"
        )
    if not (query.dtype == keys.dtype == values.dtype):
        raise ValueError(f"query, keys, values dtypes differ: {query.dtype}, {keys.dtype}, {values.dtype}")
    if offsets.dim() != 1 or capacities.shape != offsets.shape:
        raise ValueError(
            "offsets and capacities must both be (kv_heads,), "
            f"got {tuple(offsets.shape)} and {tuple(capacities.shape)}"
        )
    kv_heads = offsets.shape[0]
    if kv_heads == 0 or num_q_heads % kv_heads != 0:
        raise ValueError(f"num_q_heads={num_q_heads} is not a positive multiple of kv_heads={kv_heads}")
    if lengths.shape != (batch, kv_heads):
        raise ValueError(f"lengths must be (batch, kv_heads) = {(batch, kv_heads)}, got {tuple(lengths.shape)}")
    return num_q_heads // kv_heads


def decode_attention_reference(
    query, keys, values, offsets, capacities, lengths, scale=None, return_probs=False, num_splits=None
):
    """Plain-PyTorch decode attention over the flat cache, one KV head at a time (num_splits is ignored)."""
    group = _check_decode_inputs(query, keys, values, offsets, capacities, lengths)
    batch, num_q_heads, head_dim = query.shape
    scale = head_dim ** -0.5 if scale is None else scale
    output = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=query.device)
    probs = torch.zeros(batch, keys.shape[1], dtype=torch.float32, device=query.device)
    for kv_head, (offset, capacity) in enumerate(zip(offsets.tolist(), capacities.tolist())):
        segment = slice(offset, offset + capacity)
        heads = slice(kv_head * group, (kv_head + 1) * group)
        head_query = query[:, heads].float()  # (batch, group, head_dim)
        head_keys = keys[:, segment].float()  # (batch, capacity, head_dim)
        head_values = values[:, segment].float()
        filled = torch.arange(capacity, device=query.device) < lengths[:, kv_head, None]  # (batch, capacity)
        scores = torch.einsum("bgd,bnd->bgn", head_query, head_keys) * scale
        scores = scores.masked_fill(~filled[:, None, :], float("-inf"))
        # A head without filled slots gives an all -inf row (NaN softmax); it contributes zeros.
        head_probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (batch, group, capacity)
        output[:, heads] = torch.einsum("bgn,bnd->bgd", head_probs, head_values)
        probs[:, segment] = head_probs.sum(dim=1)
    output = output.to(query.dtype)
    return (output, probs) if return_probs else output


def _default_num_splits(batch, kv_heads, max_capacity, block_n, device):
    """Enough splits to fill the GPU twice over, as long as each keeps MIN_BLOCKS_PER_SPLIT blocks."""
    if device.type != "cuda":
        return 1
    wanted_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    by_occupancy = triton.cdiv(wanted_programs, batch * kv_heads)
    by_length = triton.cdiv(max_capacity, block_n) // MIN_BLOCKS_PER_SPLIT
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def decode_attention_triton(
    query, keys, values, offsets, capacities, lengths, scale=None, return_probs=False, num_splits=None
):
    """Triton decode attention: split kernel, log-sum-exp merge kernel, optional probabilities kernel."""
    group = _check_decode_inputs(query, keys, values, offsets, capacities, lengths)
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    batch, num_q_heads, head_dim = query.shape
    kv_heads = offsets.shape[0]
    device = query.device
    scale = head_dim ** -0.5 if scale is None else scale
    scale_log2 = scale * math.log2(math.e)
    offsets = offsets.to(device)
    lengths = lengths.to(device)
    max_capacity = int(capacities.max())

    block_d = max(16, triton.next_power_of_2(head_dim))
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    max_block_n = block_rows(block_d, keys.dtype)
    if num_splits is None:
        num_splits = _default_num_splits(batch, kv_heads, max_capacity, max_block_n, device)
    # Blocks no larger than a split's share of the longest segment.
    block_n = min(max_block_n, max(16, triton.next_power_of_2(triton.cdiv(max_capacity, num_splits))))

    partial_max = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=device)
    partial_sum = torch.empty_like(partial_max)
    partial_out = torch.empty(batch, num_q_heads, num_splits, block_d, dtype=torch.float32, device=device)
    _decode_split_kernel[(num_splits, kv_heads, batch)](
        query, keys, values, offsets, lengths,
        partial_max, partial_sum, partial_out,
        scale_log2, head_dim, num_splits,
        *query.stride(), *keys.stride(), *values.stride(), *lengths.stride(),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(query.dtype),
    )

    output = torch.empty_like(query)
    lse_log2 = torch.empty(batch, num_q_heads, dtype=torch.float32, device=device)
    _decode_merge_kernel[(num_q_heads, batch)](
        partial_max, partial_sum, partial_out, output, lse_log2,
        head_dim, num_splits, *output.stride(),
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
    )
    if not return_probs:
        return output

    probs = torch.zeros(batch, keys.shape[1], dtype=torch.float32, device=device)
    _decode_probs_kernel[(max(1, triton.cdiv(max_capacity, block_n)), kv_heads, batch)](
        query, keys, offsets, lengths, lse_log2, probs,
        scale_log2, head_dim,
        *query.stride(), *keys.stride(), *lengths.stride(), *probs.stride(),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(query.dtype),
    )
    return output, probs


def decode_attention(
    query, keys, values, offsets, capacities, lengths, scale=None, return_probs=False, num_splits=None
):
    """Decode attention over the flat compressed cache.

    query (batch, num_q_heads, head_dim); keys, values (batch, total_slots, head_dim); offsets,
    capacities (kv_heads,); lengths int32 (batch, kv_heads). Returns output (batch, num_q_heads,
    head_dim) in query dtype and, with return_probs, probs (batch, total_slots) float32: each filled
    slot's softmax probability summed over its group's query heads (0 elsewhere). Heads with
    lengths 0 give zeros. The Triton path reads capacities.max() to size its grid: keep capacities
    on the CPU to spare a device synchronisation per call.
    """
    implementation = decode_attention_triton if use_triton(query) else decode_attention_reference
    return implementation(query, keys, values, offsets, capacities, lengths, scale, return_probs, num_splits)
