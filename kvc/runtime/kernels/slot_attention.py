"""Attention of a chunk of queries over each KV head's slots of the flat compressed cache.

Each KV head reads its own segment of the layer buffer; a slot counts when its position is >= 0.
All query heads of a GQA group and all queries of the chunk share one pass over the segment.
Rows are read where they lie: floats in the cache dtype, or low-bit codes with their float16 step
and minimum, dequantised in registers (Triton) or block by block (the reference), never as a
float copy of the layer. The result is the attention over the slots alone, with its log-sum-exp,
so the caller merges it with the chunk's attention to itself; with `extra_lse` (that other part's
log-sum-exp) it can also return each slot's probability under the merged softmax, summed over the
group's query heads and the chunk (what frequency heads accumulate).
"""

from __future__ import annotations

import math
import os
import threading

import torch
import triton
import triton.language as tl

from kvc.runtime.quantize import Rows, decode_turned

REFERENCE_BLOCK = 2048  # rows the reference dequantises at a time
MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 128


def dot_precision(dtype):
    """tl.dot precision for operands upcast from dtype to float32: ieee for float32 inputs, tf32 holds 16-bit exactly."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_rows(block_d, itemsize):
    """Rows of a (rows, block_d) tile: 16..64, at most 16 KiB per tile (fits the shared memory of any GPU since Ampere)."""
    return min(64, max(16, 16384 // (block_d * itemsize)))


def use_triton(tensor):
    """Triton runs on CUDA tensors, or anywhere under the Triton interpreter (TRITON_INTERPRET=1)."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _check(query, keys, values, positions, segments, bits):
    if query.dim() != 4:
        raise ValueError(f"query must be (batch, q_heads, chunk, head_dim), got {tuple(query.shape)}")
    codes = keys.codes if bits else keys
    if codes.dim() != 3 or positions.shape != codes.shape[:2] or codes.shape[0] != query.shape[0]:
        raise ValueError(f"keys {tuple(codes.shape)} and positions {tuple(positions.shape)} do not match "
                         f"query {tuple(query.shape)} as (batch, slots, ...)")
    kv_heads = len(segments)
    if kv_heads == 0 or query.shape[1] % kv_heads:
        raise ValueError(f"q_heads={query.shape[1]} is not a positive multiple of kv_heads={kv_heads}")
    if any(offset + capacity > positions.shape[1] for offset, capacity in segments):
        raise ValueError(f"a segment ends beyond the {positions.shape[1]} slots")
    return query.shape[1] // kv_heads


def softmax_with_lse(scores: torch.Tensor):
    """Softmax over the last dimension and its log-sum-exp; a row of -inf gives zero weights and -inf."""
    top = scores.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    exps = (scores - top).exp_()  # in place on the fresh difference: one buffer fewer
    total = exps.sum(-1, keepdim=True)  # >= 1 unless the whole row is -inf
    return exps / total.clamp(min=1.0), (top + total.log()).squeeze(-1)


def _probability_weights(lse, extra_lse):
    """exp(lse - merged lse) per query row: how much of the merged softmax the slots hold."""
    if extra_lse is None:
        return torch.ones_like(lse)
    total = torch.logaddexp(lse, extra_lse)
    return torch.exp(lse - total).nan_to_num(0.0)


def slot_attention_reference(query, keys, values, positions, segments, scale, bits=0, extra_lse=None,
                             return_probs=False, table=None):
    """Plain-PyTorch slot attention, REFERENCE_BLOCK rows of each head dequantised at a time.

    A few query rows per head (decode) read the heads in runs: consecutive heads of one capacity
    (most layers' heads are one run) are one batched product over their segments, so each head
    reads only its own slots with no Python loop over heads. In an exported graph a layer whose
    heads have different capacities is one padded run (`_attend_padded`) rather than one run per
    capacity: fewer nodes (onnxruntime's step time follows their count), for up to PADDED_WASTE
    times the slots read. Longer chunks go head by head, which bounds their (rows, slots) scores to
    one head's.
    """
    group = _check(query, keys, values, positions, segments, bits)
    batch, q_heads, chunk, head_dim = query.shape
    if group * chunk <= RUN_ROWS and _pads(segments):
        return _attend_padded(query, keys, values, positions, segments, scale, bits, extra_lse, return_probs, table)
    output = torch.zeros(batch, q_heads, chunk, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.full((batch, q_heads, chunk), float("-inf"), dtype=torch.float32, device=query.device)
    pieces, filled = [], 0  # the probabilities of the runs in slot order, zeros between them
    runs = head_runs(segments) if group * chunk <= RUN_ROWS else [(head, 1) for head in range(len(segments))]
    for first_head, count in runs:
        offset, capacity = segments[first_head]
        if not capacity:
            continue
        heads = slice(first_head * group, (first_head + count) * group)
        parts = _attend_run(query[:, heads], keys, values, positions, offset, count, capacity, scale, bits,
                            None if extra_lse is None else extra_lse[:, heads], return_probs)
        output[:, heads], lse[:, heads] = parts[0], parts[1]
        if return_probs:
            pieces += [_zeros(batch, offset - filled, query.device), parts[2]]
            filled = offset + count * capacity
    if not return_probs:
        return output, lse
    # One concatenation, not a sum into slices of zeros: a compiled step would otherwise carry a
    # nested select per run into every later read of the scores.
    return output, lse, torch.cat([*pieces, _zeros(batch, positions.shape[1] - filled, query.device)], 1)


def _zeros(batch: int, slots: int, device) -> torch.Tensor:
    return torch.zeros(batch, slots, dtype=torch.float32, device=device)


RUN_ROWS = 32  # query rows per head up to which heads are read in runs rather than one by one


def head_runs(segments) -> list[tuple[int, int]]:
    """(first head, heads) of each run of consecutive heads with one capacity and adjacent segments."""
    runs = []
    for head, (offset, capacity) in enumerate(segments):
        if runs:
            first, count = runs[-1]
            run_offset, run_capacity = segments[first]
            if capacity == run_capacity and offset == run_offset + count * run_capacity:
                runs[-1] = (first, count + 1)
                continue
        runs.append((head, 1))
    return runs


def read_rows(rows, first: int, last: int, bits: int) -> torch.Tensor:
    """Slots [first, last) of K or V rows (..., slots, head_dim) as (..., last - first, head_dim) float32.

    Eagerly, rows that are not float32 already are read into one reused buffer (`_scratch`), so the
    block lives only until the next read."""
    if bits:
        codes, params = rows
        block = Rows(codes[..., first:last, :], params[..., first:last, :, :])
        shape = (*block.codes.shape[:-1], block.codes.shape[-1] * (8 // bits))
        return decode_turned(block, bits, out=_scratch(shape, codes.device))
    block = rows[..., first:last, :]
    if block.dtype == torch.float32:
        return block
    buffer = _scratch(block.shape, block.device)
    return block.float() if buffer is None else buffer.copy_(block)


_workspace = threading.local()


def _scratch(shape, device) -> torch.Tensor | None:
    """A float32 buffer of `shape` that every eager block read reuses (one per thread and device).

    A decode step would otherwise allocate a float copy of every block of rows it reads, four times
    the bytes of 8-bit rows. None while traced (a compiled or exported graph plans its own buffers)
    or while autograd records (a product keeps its operand for the backward pass)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return None
    buffers = _workspace.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buffer = buffers.get(device)
    if buffer is None or buffer.numel() < size:
        buffer = buffers[device] = torch.empty(size, dtype=torch.float32, device=device)
    return buffer[:size].view(shape)


def _split_heads(rows, offset: int, heads: int, capacity: int):
    """The slots of `heads` adjacent segments of one capacity from `offset`, as (batch, heads, capacity, ...)."""
    if isinstance(rows, Rows):
        return Rows(*(_split_heads(part, offset, heads, capacity) for part in rows))
    return rows[:, offset:offset + heads * capacity].unflatten(1, (heads, capacity))


FUSED_ROWS = 16  # query rows per head up to which a compiled step reads the rows inside its sums
# row formats read inside sums: floats and 8-bit codes (4- and 2-bit codes unpacked inside the sums
# compiled to a step 60 times slower at 7,680 tokens: they keep the matrix products)
FUSED_BITS = (0, 8)


def _compiling() -> bool:
    """True while torch.compile traces (not torch.export, whose graphs keep the matrix products)."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def _blocks(capacity: int) -> list[tuple[int, int]]:
    """(first, last) slots of each block the eager reference reads at a time."""
    return [(first, min(first + REFERENCE_BLOCK, capacity)) for first in range(0, capacity, REFERENCE_BLOCK)]


def _products(flat, keys, capacity: int, bits: int, fused: bool) -> torch.Tensor:
    """Query rows (batch, heads, rows, head_dim) times every key of their head: (batch, heads, rows, capacity).

    fused: as sums of products, which a compiler turns into one pass that dequantises each row in
    registers, with no float copy of the rows (one layer's compiled attention measured about 1.8x
    faster than matrix products over a dequantised copy); else matrix products block by block.
    One sum per query row: inductor fuses them into one loop that dequantises each key once for all
    the group's rows (one broadcast sum over (rows, keys) dequantised it once per row: 1.4x slower)."""
    if fused:
        keys = read_rows(keys, 0, capacity, bits)
        return torch.stack([(keys * flat[:, :, row, None]).sum(-1) for row in range(flat.shape[2])], 2)
    return torch.cat([flat @ read_rows(keys, a, b, bits).transpose(-1, -2) for a, b in _blocks(capacity)], -1)


def _weighted(weights, values, capacity: int, bits: int, fused: bool) -> torch.Tensor:
    """Weights (batch, heads, rows, capacity) times the values of their head: (batch, heads, rows, head_dim)."""
    if fused:
        values = read_rows(values, 0, capacity, bits)
        return torch.stack([(weights[:, :, row, :, None] * values).sum(-2) for row in range(weights.shape[2])], 2)
    return sum(weights[..., a:b] @ read_rows(values, a, b, bits) for a, b in _blocks(capacity))


def _attend_run(query, keys, values, positions, offset, heads, capacity, scale, bits, extra_lse, return_probs):
    """The query heads of a run of KV heads, each over its own segment: (output, lse[, probs of the run's slots])."""
    keys, values = (_split_heads(buffer, offset, heads, capacity) for buffer in (keys, values))
    empty = _split_heads(positions, offset, heads, capacity) < 0  # (batch, heads, capacity)
    return _attend_heads(query, keys, values, empty, scale, bits, extra_lse, return_probs)


PADDED_WASTE = 2.0  # an exported layer's heads are one padded run while that reads at most this many times their slots


def _pads(segments) -> bool:
    """Whether the heads are read as one padded run: while torch.export traces (not eagerly, where
    a run reads its slots in place, nor under torch.compile, whose fused sums read them per run), on
    heads of more than one capacity, within PADDED_WASTE."""
    if not torch.compiler.is_exporting():  # eager decode returns here, before any work per head
        return False
    capacities = [capacity for _, capacity in segments]
    return len({*capacities} - {0}) >= 2 and len(capacities) * max(capacities) <= PADDED_WASTE * sum(capacities)


def _attend_padded(query, keys, values, positions, segments, scale, bits, extra_lse, return_probs, table=None):
    """Every KV head over its own segment as one run of the longest capacity: each head's rows are
    gathered to that length (past its end it repeats its last slot, read as empty), and its slots'
    probabilities are scattered back to their places in the layer (zeros in slots of no head)."""
    if table is None:
        table = torch.tensor(segments, dtype=torch.int64, device=query.device).reshape(len(segments), 2)
    heads, slots = len(segments), positions.shape[1]
    longest = max(capacity for _, capacity in segments)
    offset, capacity = table[:, 0:1], table[:, 1:2]  # (heads, 1): the layout table's first two columns
    place = torch.arange(longest, device=query.device)
    real = place < capacity  # (heads, longest)
    source = torch.where(real, offset + place, offset + capacity - 1).clamp(min=0).flatten()  # an empty head: slot 0

    def padded(rows):
        if isinstance(rows, Rows):
            return Rows(*(padded(part) for part in rows))
        return rows.index_select(1, source).unflatten(1, (heads, longest))

    empty = (padded(positions) < 0) | ~real
    parts = _attend_heads(query, padded(keys), padded(values), empty, scale, bits, extra_lse, return_probs)
    if not return_probs:
        return parts
    target = torch.where(real, source.view(heads, longest), slots).flatten()  # past an end: one spare slot
    batch = query.shape[0]
    spread = _zeros(batch, slots + 1, query.device).index_copy(1, target, parts[2])
    return parts[0], parts[1], spread[:, :slots]


def _attend_heads(query, keys, values, empty, scale, bits, extra_lse, return_probs):
    """The query heads of KV heads whose slots are (batch, heads, capacity, ...), `empty` where a slot
    holds no token: (output, lse[, probs of the slots, flattened])."""
    batch, q_heads, chunk, head_dim = query.shape
    heads, capacity = empty.shape[1:]
    rows = q_heads // heads * chunk  # a KV head's query rows, head-major: one product serves its group
    flat = query.float().reshape(batch, heads, rows, head_dim)
    fused = rows <= FUSED_ROWS and bits in FUSED_BITS and _compiling()
    scores = _products(flat, keys, capacity, bits, fused).mul_(scale)  # in place on fresh scores: no copy
    weights, lse = softmax_with_lse(scores.masked_fill_(empty[:, :, None], float("-inf")))
    output = _weighted(weights, values, capacity, bits, fused)
    output, lse = output.reshape(batch, q_heads, chunk, head_dim), lse.reshape(batch, q_heads, chunk)
    if not return_probs:
        return output, lse
    share = _probability_weights(lse, extra_lse).reshape(batch, heads, rows, 1)
    # summed over the rows: fused into one loop when compiled; eagerly a product, with no weighted copy
    summed = (weights * share).sum(2) if fused else (share.transpose(-1, -2) @ weights).squeeze(2)
    return output, lse, summed.flatten(1)


@triton.jit
def _load_rows(rows_ptr, params_ptr, slots, dims, slot_mask, dim_mask, stride_batch, stride_slot,
               params_stride_batch, params_stride_slot, batch,
               BITS: tl.constexpr, QUANT_GROUP: tl.constexpr):
    """A (slots, dims) tile as float32: floats as stored, or low-bit codes dequantised here."""
    mask = slot_mask[:, None] & dim_mask[None, :]
    base = rows_ptr + batch * stride_batch + slots[:, None].to(tl.int64) * stride_slot
    if BITS == 0:
        return tl.load(base + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    PER_BYTE: tl.constexpr = 8 // BITS
    packed = tl.load(base + (dims // PER_BYTE)[None, :], mask=mask, other=0).to(tl.int32)
    codes = (packed >> ((dims % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
    params = (params_ptr + batch * params_stride_batch + slots[:, None].to(tl.int64) * params_stride_slot
              + (dims // QUANT_GROUP)[None, :] * 2)
    step = tl.load(params, mask=mask, other=0.0).to(tl.float32)
    low = tl.load(params + 1, mask=mask, other=0.0).to(tl.float32)
    return codes.to(tl.float32) * step + low


@triton.jit
def _load_queries(query_ptr, batch, kv_head, chunk, dims, dim_mask, stride_batch, stride_head, stride_chunk,
                  GROUP: tl.constexpr, ROWS_PAD: tl.constexpr):
    """The group's query rows as float32 (ROWS_PAD, BLOCK_D): row r is (query head r // chunk, position r % chunk)."""
    rows = tl.arange(0, ROWS_PAD)
    row_mask = rows < GROUP * chunk
    q_heads = kv_head * GROUP + rows // chunk
    queries = rows % chunk
    query = tl.load(query_ptr + batch * stride_batch + q_heads[:, None] * stride_head + queries[:, None] * stride_chunk
                    + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)
    return query, row_mask, q_heads, queries


@triton.jit
def _split_kernel(
    query_ptr, keys_ptr, key_params_ptr, values_ptr, value_params_ptr, positions_ptr, table_ptr,
    partial_max_ptr, partial_sum_ptr, partial_out_ptr,
    scale_log2, head_dim, chunk, num_splits, table_width,
    stride_query_batch, stride_query_head, stride_query_chunk,
    stride_rows_batch, stride_rows_slot, stride_params_batch, stride_params_slot, stride_positions_batch,
    GROUP: tl.constexpr, ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BITS: tl.constexpr, QUANT_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (split, kv_head, batch): partial softmax statistics of every query row of the group."""
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    num_q_heads = tl.num_programs(1) * GROUP

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    query, row_mask, q_heads, queries = _load_queries(
        query_ptr, batch, kv_head, chunk, dims, dim_mask, stride_query_batch, stride_query_head, stride_query_chunk,
        GROUP, ROWS_PAD)

    offset = tl.load(table_ptr + kv_head * table_width)
    capacity = tl.load(table_ptr + kv_head * table_width + 1)
    share = tl.cdiv(capacity, num_splits)
    first = split * share
    last = tl.minimum(first + share, capacity)

    running_max = tl.full((ROWS_PAD,), float("-inf"), tl.float32)
    running_sum = tl.zeros((ROWS_PAD,), tl.float32)
    acc = tl.zeros((ROWS_PAD, BLOCK_D), tl.float32)
    for block in range(first, last, BLOCK_N):
        local = block + tl.arange(0, BLOCK_N)
        slots = offset + local
        in_segment = local < last
        filled = in_segment & (tl.load(positions_ptr + batch * stride_positions_batch + slots,
                                       mask=in_segment, other=-1) >= 0)
        keys = _load_rows(keys_ptr, key_params_ptr, slots, dims, in_segment, dim_mask, stride_rows_batch,
                          stride_rows_slot, stride_params_batch, stride_params_slot, batch, BITS, QUANT_GROUP)
        scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(filled[None, :], scores, float("-inf"))  # (ROWS_PAD, BLOCK_N)
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a block of empty slots keeps NaN out
        alpha = tl.exp2(running_max - shift)
        weights = tl.exp2(scores - shift[:, None])
        running_sum = running_sum * alpha + tl.sum(weights, axis=1)
        values = _load_rows(values_ptr, value_params_ptr, slots, dims, in_segment, dim_mask, stride_rows_batch,
                            stride_rows_slot, stride_params_batch, stride_params_slot, batch, BITS, QUANT_GROUP)
        acc = acc * alpha[:, None] + tl.dot(weights, values, input_precision=DOT_PRECISION)
        running_max = new_max

    stat_index = ((batch * num_q_heads + q_heads) * chunk + queries) * num_splits + split
    tl.store(partial_max_ptr + stat_index, running_max, mask=row_mask)
    tl.store(partial_sum_ptr + stat_index, running_sum, mask=row_mask)
    tl.store(partial_out_ptr + stat_index[:, None] * BLOCK_D + dims[None, :], acc, mask=row_mask[:, None])


@triton.jit
def _merge_kernel(
    partial_max_ptr, partial_sum_ptr, partial_out_ptr, output_ptr, lse_ptr, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per query row (batch, q_head, chunk position): log-sum-exp merge of the splits."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    index = row * num_splits + splits
    split_max = tl.load(partial_max_ptr + index, mask=split_mask, other=float("-inf"))
    split_sum = tl.load(partial_sum_ptr + index, mask=split_mask, other=0.0)
    split_out = tl.load(partial_out_ptr + index[:, None] * BLOCK_D + dims[None, :], mask=split_mask[:, None], other=0.0)
    global_max = tl.max(split_max, axis=0)
    shift = tl.where(global_max == float("-inf"), 0.0, global_max)
    weight = tl.where(split_max == float("-inf"), 0.0, tl.exp2(split_max - shift))
    denominator = tl.sum(weight * split_sum, axis=0)
    safe = tl.where(denominator > 0.0, denominator, 1.0)
    output = tl.sum(weight[:, None] * split_out, axis=0) / safe
    lse_log2 = tl.where(denominator > 0.0, shift + tl.log2(safe), float("-inf"))
    tl.store(output_ptr + row * head_dim + dims, output, mask=dims < head_dim)
    tl.store(lse_ptr + row, lse_log2)


@triton.jit
def _probs_kernel(
    query_ptr, keys_ptr, key_params_ptr, positions_ptr, table_ptr, lse_ptr, share_ptr, probs_ptr,
    scale_log2, head_dim, chunk, table_width,
    stride_query_batch, stride_query_head, stride_query_chunk,
    stride_rows_batch, stride_rows_slot, stride_params_batch, stride_params_slot, stride_positions_batch,
    GROUP: tl.constexpr, ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BITS: tl.constexpr, QUANT_GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (slot block, kv_head, batch): merged-softmax probabilities summed over the group's rows."""
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    num_q_heads = tl.num_programs(1) * GROUP

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    query, row_mask, q_heads, queries = _load_queries(
        query_ptr, batch, kv_head, chunk, dims, dim_mask, stride_query_batch, stride_query_head, stride_query_chunk,
        GROUP, ROWS_PAD)
    row_index = (batch * num_q_heads + q_heads) * chunk + queries

    offset = tl.load(table_ptr + kv_head * table_width)
    capacity = tl.load(table_ptr + kv_head * table_width + 1)
    local = block * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = offset + local
    in_segment = local < capacity
    filled = in_segment & (tl.load(positions_ptr + batch * stride_positions_batch + slots,
                                   mask=in_segment, other=-1) >= 0)
    keys = _load_rows(keys_ptr, key_params_ptr, slots, dims, in_segment, dim_mask, stride_rows_batch,
                      stride_rows_slot, stride_params_batch, stride_params_slot, batch, BITS, QUANT_GROUP)
    lse_log2 = tl.load(lse_ptr + row_index, mask=row_mask, other=0.0)
    lse_log2 = tl.where(lse_log2 == float("-inf"), 0.0, lse_log2)
    share = tl.load(share_ptr + row_index, mask=row_mask, other=0.0)
    scores = tl.dot(query, tl.trans(keys), input_precision=DOT_PRECISION) * scale_log2
    probs = tl.exp2(scores - lse_log2[:, None]) * share[:, None]
    probs = tl.where(row_mask[:, None] & filled[None, :], probs, 0.0)
    tl.store(probs_ptr + batch * stride_positions_batch + slots, tl.sum(probs, axis=0), mask=in_segment)


def _default_num_splits(batch, kv_heads, max_capacity, block_n, device):
    """Enough splits to fill the GPU twice over, as long as each keeps MIN_BLOCKS_PER_SPLIT blocks."""
    if device.type != "cuda":
        return 1
    wanted_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    by_occupancy = triton.cdiv(wanted_programs, batch * kv_heads)
    by_length = triton.cdiv(max_capacity, block_n) // MIN_BLOCKS_PER_SPLIT
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


def slot_attention_triton(query, keys, values, positions, segments, scale, bits=0, extra_lse=None,
                          return_probs=False, table=None, num_splits=None):
    """Triton slot attention: split kernel, log-sum-exp merge kernel, optional probabilities kernel.

    table: the layout's (kv_heads, width) integer head table on the query's device, whose first two
    columns are each head's offset and capacity (built from `segments` when not given).
    """
    group = _check(query, keys, values, positions, segments, bits)
    batch, q_heads, chunk, head_dim = query.shape
    device = query.device
    if table is None:
        table = torch.tensor(segments, dtype=torch.int32, device=device).reshape(len(segments), 2)
    query = query.float().contiguous()
    if bits:
        key_rows, key_params, value_rows, value_params = keys.codes, keys.params, values.codes, values.params
        quant_group = head_dim // keys.params.shape[-2]
        params_strides = (key_params.stride(0), key_params.stride(1))
    else:
        key_rows, key_params, value_rows, value_params = keys, keys, values, values
        quant_group, params_strides = head_dim, (0, 0)
    assert key_rows.stride() == value_rows.stride() and key_rows.stride(2) == 1
    max_capacity = max(capacity for _, capacity in segments)
    block_d = max(16, triton.next_power_of_2(head_dim))
    rows_pad = max(16, triton.next_power_of_2(group * chunk))
    block_n = block_rows(block_d, 4)  # tiles are float32 once loaded
    if num_splits is None:
        num_splits = _default_num_splits(batch, len(segments), max_capacity, block_n, device)
    scale_log2 = scale * math.log2(math.e)
    common = (scale_log2, head_dim, chunk)
    strides = (*query.stride()[:3], key_rows.stride(0), key_rows.stride(1), *params_strides, positions.stride(0))
    constants = dict(GROUP=group, ROWS_PAD=rows_pad, BLOCK_N=block_n, BLOCK_D=block_d, BITS=bits,
                     QUANT_GROUP=quant_group, DOT_PRECISION="ieee")

    partial_max = torch.empty(batch, q_heads, chunk, num_splits, dtype=torch.float32, device=device)
    partial_sum = torch.empty_like(partial_max)
    partial_out = torch.empty(batch, q_heads, chunk, num_splits, block_d, dtype=torch.float32, device=device)
    _split_kernel[(num_splits, len(segments), batch)](
        query, key_rows, key_params, value_rows, value_params, positions, table,
        partial_max, partial_sum, partial_out, *common, num_splits, table.shape[1], *strides, **constants,
    )
    output = torch.empty(batch, q_heads, chunk, head_dim, dtype=torch.float32, device=device)
    lse_log2 = torch.empty(batch, q_heads, chunk, dtype=torch.float32, device=device)
    _merge_kernel[(batch * q_heads * chunk,)](
        partial_max, partial_sum, partial_out, output, lse_log2, head_dim, num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
    )
    lse = lse_log2 * math.log(2.0)
    if not return_probs:
        return output, lse
    share = _probability_weights(lse, extra_lse).contiguous()
    probs = torch.zeros(positions.shape, dtype=torch.float32, device=device)
    _probs_kernel[(max(1, triton.cdiv(max_capacity, block_n)), len(segments), batch)](
        query, key_rows, key_params, positions, table, lse_log2, share, probs,
        *common, table.shape[1], *strides, **constants,
    )
    return output, lse, probs


def slot_attention(query, keys, values, positions, segments, scale, bits=0, extra_lse=None, return_probs=False,
                   table=None):
    """Attention of (batch, q_heads, chunk, head_dim) queries over every head's filled slots.

    keys, values: (batch, slots, head_dim) floats, or low-bit `Rows` (queries then turned);
    positions (batch, slots) int32, -1 for an empty slot; segments: per KV head (offset, capacity).
    Returns the output (batch, q_heads, chunk, head_dim) float32 normalised over the slots, its
    log-sum-exp (batch, q_heads, chunk) (-inf where a head has no filled slot) and, with
    return_probs, (batch, slots) float32 probabilities under the softmax merged with `extra_lse`.
    table: the segments as a device tensor whose first columns are (offset, capacity), so the Triton
    path reads them without a host copy per call.
    """
    implementation = slot_attention_triton if use_triton(query) else slot_attention_reference
    return implementation(query, keys, values, positions, segments, scale, bits, extra_lse, return_probs, table)
