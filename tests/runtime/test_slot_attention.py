"""Slot attention: the reference against obviously-correct attention over the decoded filled slots
(floats and 2/4/8-bit rows read in place, ragged segments with holes, empty heads, chunks of
several queries, blocks smaller than a segment), traced by torch.compile (a few query rows read the
rows inside sums of products), and the Triton kernels (interpreted) against the reference,
probabilities under a merged softmax included."""

import importlib
import operator

import pytest
import torch

from kvc.runtime.kernels import slot_attention, slot_attention_reference, slot_attention_triton, use_triton

slot_module = importlib.import_module("kvc.runtime.kernels.slot_attention")
from kvc.runtime.quantize import Rows, decode_turned, encode_turned

# (batch, group, chunk, head_dim, capacities, bits, dtype)
CASES = [
    (1, 1, 1, 64, [5, 0, 1, 37], 0, torch.float32),
    (3, 3, 2, 80, [0, 1, 20, 33], 0, torch.float32),
    (2, 4, 7, 48, [17, 1, 0], 0, torch.bfloat16),
    (2, 3, 1, 64, [40, 7, 0], 8, torch.float32),
    (1, 3, 3, 64, [33, 2], 4, torch.float32),
    (2, 2, 1, 64, [21, 5], 2, torch.float32),
    (2, 3, 2, 96, [19, 0, 6], 8, torch.float32),
    (1, 2, 5, 96, [30, 3], 4, torch.float32),
    (2, 1, 1, 96, [12, 12], 2, torch.float32),
    # heads read in runs of one capacity: all three, two then one, empty heads before a run
    (2, 3, 1, 64, [19, 19, 19], 8, torch.float32),
    (1, 3, 2, 64, [20, 20, 7], 4, torch.float32),
    (2, 2, 1, 48, [0, 0, 5, 5], 0, torch.bfloat16),
    # more query rows per head than RUN_ROWS: the reference goes head by head
    (1, 3, 12, 64, [40, 0, 9], 8, torch.float32),
    (2, 2, 17, 48, [3, 25], 0, torch.bfloat16),
]


def case_id(value):
    return str(value).replace("torch.", "").replace(" ", "")


def make_cache(generator, batch, group, chunk, head_dim, capacities, bits, dtype):
    """Random flat cache: each slot filled with probability 0.7 (the first sequence fills every slot,
    the last leaves its first segment empty); K/V as floats or low-bit rows of random turned vectors."""
    kv_heads, total = len(capacities), sum(capacities)
    segments = [(sum(capacities[:head]), capacities[head]) for head in range(kv_heads)]
    query = torch.randn(batch, kv_heads * group, chunk, head_dim, generator=generator)
    positions = torch.randint(0, 1000, (batch, total), generator=generator, dtype=torch.int32)
    positions[torch.rand(batch, total, generator=generator) > 0.7] = -1
    positions[0] = torch.arange(total, dtype=torch.int32)
    if batch > 1 and capacities[0]:
        positions[-1, :capacities[0]] = -1
    raw = [torch.randn(batch, total, head_dim, generator=generator) * 2 for _ in range(2)]
    if bits:
        keys, values = (encode_turned(x, bits) for x in raw)
    else:
        keys, values = (x.to(dtype) for x in raw)
    return query.to(dtype) if not bits else query, keys, values, positions, segments


def dense_per_head(query, keys, values, positions, segments, scale, bits, extra_lse):
    """Obviously-correct attention: every (sequence, kv_head) separately, over its filled slots only."""
    batch, q_heads, chunk, head_dim = query.shape
    group = q_heads // len(segments)
    read = (lambda rows: decode_turned(rows, bits)) if bits else (lambda rows: rows.float())
    all_keys, all_values = read(keys), read(values)
    output = torch.zeros(batch, q_heads, chunk, head_dim)
    lse = torch.full((batch, q_heads, chunk), float("-inf"))
    probs = torch.zeros(positions.shape)
    for b in range(batch):
        for kv_head, (offset, capacity) in enumerate(segments):
            slots = torch.arange(offset, offset + capacity)
            slots = slots[positions[b, slots] >= 0]
            if not len(slots):
                continue
            heads = slice(kv_head * group, (kv_head + 1) * group)
            scores = query[b, heads].float() @ all_keys[b, slots].T * scale  # (group, chunk, filled)
            lse[b, heads] = torch.logsumexp(scores, -1)
            output[b, heads] = torch.softmax(scores, -1) @ all_values[b, slots]
            merged = lse[b, heads] if extra_lse is None else torch.logaddexp(lse[b, heads], extra_lse[b, heads])
            probs[b, slots] = torch.exp(scores - merged[..., None]).sum((0, 1))
    return output, lse, probs


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("with_extra", [False, True])
def test_reference_matches_dense_attention(generator, case, with_extra, monkeypatch):
    monkeypatch.setattr(slot_module, "REFERENCE_BLOCK", 16)  # several blocks per long segment
    batch, group, chunk, head_dim, capacities, bits, dtype = case
    query, keys, values, positions, segments = make_cache(generator, *case)
    extra = torch.randn(batch, query.shape[1], chunk, generator=generator) if with_extra else None
    scale = head_dim ** -0.5
    output, lse, probs = slot_attention_reference(query, keys, values, positions, segments, scale, bits, extra, True)
    expected = dense_per_head(query, keys, values, positions, segments, scale, bits, extra)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(output, expected[0], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse, expected[1], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(probs, expected[2], atol=tolerance, rtol=tolerance)
    assert bool((probs[positions < 0] == 0).all())


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_triton_matches_reference(generator, case, num_splits):
    batch, group, chunk, head_dim, capacities, bits, dtype = case
    query, keys, values, positions, segments = make_cache(generator, *case)
    extra = torch.randn(batch, query.shape[1], chunk, generator=generator)
    scale = head_dim ** -0.5
    expected = slot_attention_reference(query, keys, values, positions, segments, scale, bits, extra, True)
    actual = slot_attention_triton(query, keys, values, positions, segments, scale, bits, extra, True,
                                   num_splits=num_splits)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


# long segments read in several blocks, where a float copy of the rows would dwarf the scores
LONG_CASES = [(1, 3, 1, 64, [600, 600, 600], 8, torch.float32), (1, 3, 2, 64, [640, 600, 500], 4, torch.float32),
              (2, 3, 1, 64, [600, 600, 600], 0, torch.bfloat16)]


@pytest.mark.parametrize("case", LONG_CASES, ids=case_id)
def test_eager_reads_reuse_one_buffer_and_keep_gradients(generator, case, monkeypatch):
    """Without autograd (how the runtime decodes) every block of rows is read into one reused buffer:
    dense attention's numbers, and all allocations together less than one float copy of the keys,
    where fresh blocks would take a float copy of the keys and one of the values.
    With autograd the blocks are fresh (a product keeps its operand for the backward pass), and the
    query's gradient is dense attention's."""
    monkeypatch.setattr(slot_module, "REFERENCE_BLOCK", 128)
    batch, group, chunk, head_dim, capacities, bits, dtype = case
    query, keys, values, positions, segments = make_cache(generator, *case)
    scale = head_dim ** -0.5
    expected = dense_per_head(query, keys, values, positions, segments, scale, bits, None)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    slot_module._workspace.__dict__.clear()
    with torch.no_grad():
        slot_attention_reference(query, keys, values, positions, segments, scale, bits)  # sizes the buffer
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
            output, lse = slot_attention_reference(query, keys, values, positions, segments, scale, bits)
    allocated = sum(event.self_cpu_memory_usage for event in profile.events() if event.self_cpu_memory_usage > 0)
    float_keys = positions.numel() * head_dim * 4
    assert allocated < float_keys, (allocated, float_keys)
    torch.testing.assert_close(output, expected[0], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse, expected[1], atol=tolerance, rtol=tolerance)

    leaf = query.float().requires_grad_()
    output, _ = slot_attention_reference(leaf, keys, values, positions, segments, scale, bits)
    (gradient,) = torch.autograd.grad(output.square().sum(), leaf)
    dense_leaf = query.float().requires_grad_()
    dense_output = dense_per_head(dense_leaf, keys, values, positions, segments, scale, bits, None)[0]
    (dense_gradient,) = torch.autograd.grad(dense_output.square().sum(), dense_leaf)
    torch.testing.assert_close(gradient, dense_gradient, atol=tolerance * 10, rtol=tolerance * 10)


def test_dispatch_and_refusals(generator):
    query, keys, values, positions, segments = make_cache(generator, *CASES[0])
    assert use_triton(query)  # the tests run Triton through its interpreter
    output, lse = slot_attention(query, keys, values, positions, segments, 0.125)
    assert output.shape == query.shape and lse.shape == query.shape[:3]
    with pytest.raises(ValueError, match="q_heads"):
        slot_attention_reference(query[:, :3], keys, values, positions, segments, 0.125)
    with pytest.raises(ValueError, match="beyond"):
        slot_attention_reference(query, keys, values, positions, [(0, 5), (5, 0), (5, 1), (6, 99)], 0.125)
    with pytest.raises(ValueError, match="chunk"):
        slot_attention_reference(query[:, :, 0], keys, values, positions, segments, 0.125)


def test_head_runs_join_adjacent_heads_of_one_capacity():
    assert slot_module.head_runs([(0, 5), (5, 5), (10, 3), (13, 3), (16, 5)]) == [(0, 2), (2, 2), (4, 1)]
    assert slot_module.head_runs([(0, 4), (8, 4)]) == [(0, 1), (1, 1)]  # a gap between them
    assert slot_module.head_runs([(0, 0), (0, 0), (0, 6)]) == [(0, 2), (2, 1)]


# A layer's heads as one padded run (how an exported graph reads heads of several capacities): the
# decode-sized cases, and a layout with slots of no head between the segments.
PADDED_CASES = [case for case in CASES if case[1] * case[2] <= slot_module.RUN_ROWS]


@pytest.mark.parametrize("case", PADDED_CASES, ids=case_id)
@pytest.mark.parametrize("with_table", [False, True])
def test_one_padded_run_matches_dense_attention(generator, case, with_table):
    batch, group, chunk, head_dim, capacities, bits, dtype = case
    query, keys, values, positions, segments = make_cache(generator, *case)
    extra = torch.randn(batch, query.shape[1], chunk, generator=generator)
    scale = head_dim ** -0.5
    table = torch.tensor(segments, dtype=torch.int64).reshape(len(segments), 2) if with_table else None
    output, lse, probs = slot_module._attend_padded(query, keys, values, positions, segments, scale, bits, extra,
                                                    True, table)
    expected = dense_per_head(query, keys, values, positions, segments, scale, bits, extra)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for got, want in zip((output, lse, probs), expected):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    no_probs = slot_module._attend_padded(query, keys, values, positions, segments, scale, bits, None, False, table)
    assert len(no_probs) == 2


def test_one_padded_run_leaves_slots_of_no_head_at_zero(generator):
    query, keys, values, positions, _ = make_cache(generator, 2, 3, 1, 64, [6, 11, 3], 8, torch.float32)
    segments = [(0, 5), (7, 9), (16, 2)]  # slots 5, 6 and 18, 19 belong to no head
    positions[:, [5, 6, 18, 19]] = 7  # filled, yet no head reads them
    output, lse, probs = slot_module._attend_padded(query, keys, values, positions, segments, 0.125, 8, None, True)
    expected = dense_per_head(query, keys, values, positions, segments, 0.125, 8, None)
    for got, want in zip((output, lse, probs), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert bool((probs[:, [5, 6, 18, 19]] == 0).all())


class _Attention(torch.nn.Module):
    def __init__(self, segments, scale, bits):
        super().__init__()
        self.segments, self.scale, self.bits = segments, scale, bits

    def forward(self, query, key_codes, key_params, value_codes, value_params, positions, extra):
        keys, values = Rows(key_codes, key_params), Rows(value_codes, value_params)
        return slot_attention_reference(query, keys, values, positions, self.segments, self.scale, self.bits,
                                        extra, True)


@pytest.mark.parametrize("capacities, runs", [([40, 30, 0], 1), ([40, 40, 7], 1), ([40, 3, 3], 2)])
def test_an_exported_layer_reads_heads_of_several_capacities_in_one_run(generator, capacities, runs):
    """torch.export reads the heads as one padded run (one product of queries and keys) while that
    reads at most PADDED_WASTE times their slots (3 x 40 against 70 and 87 slots); past that (3 x 40
    against 46), one run per capacity as eagerly. Either way the exported program gives eager
    attention's numbers."""
    case = (2, 3, 1, 64, capacities, 8, torch.float32)
    query, keys, values, positions, segments = make_cache(generator, *case)
    extra = torch.randn(2, query.shape[1], 1, generator=generator)
    inputs = (query, *keys, *values, positions, extra)
    module = _Attention(segments, 0.125, 8)
    program = torch.export.export(module, inputs)
    products = [node for node in program.graph.nodes if node.op == "call_function"
                and node.target in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default, torch.ops.aten.matmul.default)]
    assert len(products) == 3 * runs  # queries by keys, weights by values, probabilities summed
    for got, want in zip(program.module()(*inputs), module(*inputs)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _matmuls(graphs):
    return [node for graph in graphs for node in graph.graph.nodes
            if node.op == "call_function" and node.target in (operator.matmul, torch.matmul, torch.bmm)]


# (case, read inside sums): decode-sized chunks of 8-bit and float rows; 4- and 2-bit rows, and a
# chunk of 36 query rows per head, keep the matrix products
COMPILED_CASES = [(CASES[3], True), (CASES[9], True), (CASES[11], True), (CASES[4], False), (CASES[5], False),
                  (CASES[12], False)]


@pytest.mark.parametrize("case,fused", COMPILED_CASES, ids=case_id)
def test_traced_reference_reads_rows_inside_sums(generator, case, fused):
    """Under torch.compile a few query rows per head of float or 8-bit rows take sums of products
    (which the compiler fuses with the rows' dequantisation) instead of matrix products over a
    dequantised copy; more rows, and 4- or 2-bit rows, keep the products. Either way the traced
    program equals dense attention."""
    batch, group, chunk, head_dim, capacities, bits, dtype = case
    query, keys, values, positions, segments = make_cache(generator, *case)
    extra = torch.randn(batch, query.shape[1], chunk, generator=generator)
    scale = head_dim ** -0.5
    graphs = []

    def capture(graph, inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    traced = torch.compile(slot_attention_reference, backend=capture, fullgraph=True)
    output, lse, probs = traced(query, keys, values, positions, segments, scale, bits, extra, True)
    expected = dense_per_head(query, keys, values, positions, segments, scale, bits, extra)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for got, want in zip((output, lse, probs), expected):
        torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    assert graphs and (not _matmuls(graphs)) == fused


def test_inductor_compiled_low_bit_reference_equals_dense_attention(generator):
    """The sums compiled by inductor (8-bit codes scaled inside them) give dense attention's numbers."""
    case = CASES[3]
    query, keys, values, positions, segments = make_cache(generator, *case)
    scale = case[3] ** -0.5
    torch._dynamo.reset()
    compiled = torch.compile(slot_attention_reference, fullgraph=True)
    output, lse = compiled(query, keys, values, positions, segments, scale, case[5])
    expected = dense_per_head(query, keys, values, positions, segments, scale, case[5], None)
    torch.testing.assert_close(output, expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, expected[1], atol=1e-4, rtol=1e-4)
