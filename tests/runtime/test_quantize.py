"""Low-bit K/V rows: sizes match the plan's accounting, the rotation is orthogonal, decoding stays
within half a quantisation step of the input (in the rotated channels), values on the grid come
back, edge shapes (no tokens, constant groups, head dims that QUANT_GROUP does not divide, that
are not powers of two) work, and the code exports without dtype reinterpretation or bit shifts."""

import pytest
import torch

from kvc.plan import QUANT_BITS, quant_group, quant_row_bytes, row_bytes
from kvc.runtime.quantize import decode, decode_turned, encode, rotation, turn, turn_back


def row_size(rows):
    """Bytes of one row: its codes and its groups' float16 step and minimum."""
    return rows.codes.shape[-1] + rows.params.shape[-2] * rows.params.shape[-1] * rows.params.element_size()

HEAD_DIMS = [64, 96, 40, 8]  # 40 and 8: one group spanning the vector


def grouped(x, head_dim):
    return x.reshape(*x.shape[:-1], head_dim // quant_group(head_dim), quant_group(head_dim))


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decoding_is_within_half_a_step(generator, bits, head_dim):
    x = torch.randn(3, 7, head_dim, generator=generator) * 2
    x[0, 0, 0] = 40.0  # an outlier widens its group's step, not the others'
    rows = encode(x, bits)
    assert rows.codes.dtype == torch.uint8 and rows.params.dtype == torch.float16
    assert rows.codes.shape[:2] == rows.params.shape[:2] == (3, 7)
    assert row_size(rows) == quant_row_bytes(head_dim, bits)
    turn = rotation(head_dim, "cpu")
    error = grouped(((decode(rows, bits) - x) @ turn).abs(), head_dim)
    spread = grouped(x @ turn, head_dim)
    step = (spread.amax(-1) - spread.amin(-1)) / (2 ** bits - 1)
    # half a step, plus float16 rounding of the group's step and minimum
    bound = 0.5 * step * (1 + 2 ** -8) + spread.abs().amax(-1) * 2 ** -10 + 1e-5
    assert bool((error.amax(-1) <= bound).all())
    assert float(error.amax()) > 0  # the codes really are low-bit


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_values_on_the_grid_come_back_exactly(generator, bits):
    head_dim, levels = 64, 2 ** bits - 1
    codes = torch.randint(0, levels + 1, (5, head_dim), generator=generator).float()
    codes[:, [0, 32]], codes[:, [31, 63]] = 0, levels  # each group of 32 spans the whole grid
    on_grid = codes * 0.125 - 1.5  # step and minimum exact in float16
    x = on_grid @ rotation(head_dim, "cpu").T  # what the rotation turns onto the grid
    torch.testing.assert_close(decode(encode(x, bits), bits), x, atol=2e-6, rtol=0)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_the_rotation_is_orthogonal(head_dim):
    turn = rotation(head_dim, "cpu")
    torch.testing.assert_close(turn @ turn.T, torch.eye(head_dim), atol=1e-6, rtol=0)
    assert torch.equal(turn, rotation(head_dim, "cpu"))


def test_constant_groups_empty_inputs_and_dtypes():
    x = torch.full((2, 64), 3.25) @ rotation(64, "cpu").T  # every group constant once turned: a step of 0
    torch.testing.assert_close(decode(encode(x, 4), 4), x, atol=2e-6, rtol=0)
    empty = encode(torch.zeros(0, 5, 64), 4)
    assert empty.codes.shape == (0, 5, 32) and decode(empty, 4).shape == (0, 5, 64)
    halves = decode(encode(torch.randn(4, 64, dtype=torch.bfloat16), 8), 8, torch.bfloat16)
    assert halves.dtype == torch.bfloat16 and halves.shape == (4, 64)


def test_row_sizes():
    assert row_bytes(128, "bfloat16") == 256 and row_bytes(64, "float32") == 256
    assert quant_row_bytes(128, 4) == 64 + 4 * 4  # codes, then a float16 step and minimum per 32 channels
    assert quant_row_bytes(64, 2) == 16 + 2 * 4 and quant_row_bytes(64, 8) == 64 + 2 * 4
    assert quant_row_bytes(40, 4) == 20 + 4  # one group
    with pytest.raises(ValueError, match="bits=3"):
        encode(torch.zeros(2, 64), 3)


@pytest.mark.parametrize("bits", QUANT_BITS)
def test_rows_are_read_turned(generator, bits):
    """Attention reads rows where they lie: a turned query against turned rows gives the same scores."""
    keys, query = torch.randn(6, 64, generator=generator), torch.randn(3, 64, generator=generator)
    rows = encode(keys, bits)
    torch.testing.assert_close(turn(query) @ decode_turned(rows, bits).T, query @ decode(rows, bits).T,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(turn_back(turn(query)), query, atol=1e-5, rtol=0)


class RoundTrip(torch.nn.Module):
    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def forward(self, x):
        rows = encode(x, self.bits)
        return rows.codes, rows.params, decode_turned(rows, self.bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_rows_export_without_reinterpretation_or_shifts(generator, bits):
    """ONNX has no dtype reinterpretation and its shifts need unsigned types: the exported graph has neither."""
    program = torch.export.export(RoundTrip(bits), (torch.randn(2, 3, 64, generator=generator),))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not {op for op in ops if "shift" in op or "bitwise" in op or op.endswith("view.dtype")}, ops
    if bits < 8:  # codes are packed by integer arithmetic, unpacked by float floors and fractions
        assert {"aten.mul.Tensor", "aten.floor_.default", "aten.frac_.default"} <= ops, ops
        assert not {op for op in ops if "remainder" in op or "floor_divide" in op or "div.Tensor_mode" in op}, ops


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reading_rows_allocates_one_float_buffer(generator, bits):
    """The codes become floats once and are scaled in place; below 8 bits the packed bytes become
    floats first (a buffer of 8 / bits times fewer floats), then unpacked in place: no further buffer
    of the rows' size."""
    rows = encode(torch.randn(4, 512, 64, generator=generator), bits)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        decoded = decode_turned(rows, bits)
    allocated = sum(event.self_cpu_memory_usage for event in profile.events() if event.self_cpu_memory_usage > 0)
    floats = decoded.numel() * decoded.element_size()
    unpacking = 0 if bits == 8 else rows.codes.numel() * 4
    assert floats + unpacking <= allocated < 1.1 * (floats + unpacking)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reading_rows_into_a_buffer_allocates_nothing_of_their_size(generator, bits):
    """Given a buffer, the codes go straight into it (unpacked there below 8 bits): the same numbers,
    and no allocation as large as a tenth of the rows' floats."""
    rows = encode(torch.randn(4, 512, 64, generator=generator), bits)
    expected = decode_turned(rows, bits)
    buffer = torch.full_like(expected, float("nan"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        decoded = decode_turned(rows, bits, out=buffer)
    largest = max((event.self_cpu_memory_usage for event in profile.events()), default=0)
    assert decoded.data_ptr() == buffer.data_ptr()
    assert largest < expected.numel() * 4 / 10, largest
    torch.testing.assert_close(decoded, expected, atol=0, rtol=0)
