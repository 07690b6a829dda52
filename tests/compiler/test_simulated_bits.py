"""benchmarks/simulated_bits.py, the measurement behind "per-head bit widths at 10%": its 8-bit rows hold exactly
the chosen heads' 4-bit values, the rest untouched, and it prices a plan's slots at the mixed widths."""

import importlib.util
from pathlib import Path

import pytest
import torch

from kvc.compiler import compile_policy
from kvc.plan import slot_bytes
from kvc.runtime import quantize

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "simulated_bits.py"


@pytest.fixture(scope="module")
def simulated():
    spec = importlib.util.spec_from_file_location("simulated_bits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(1, 3, 7, 64), (2, 3, 1, 2, 64)])  # a prefill's rows; an extend's keys and values
def test_chosen_heads_hold_their_4_bit_values_and_the_others_their_8_bit_rows(simulated, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    matrix = quantize.rotation(64, "cpu")
    heads = torch.tensor([True, False, True])
    rows = quantize.encode(x, 8, matrix)
    mixed = simulated.rounded_to_low_bits(x, rows, heads, matrix)
    assert mixed.codes.dtype == torch.uint8 and mixed.codes.shape == rows.codes.shape
    low = quantize.decode(quantize.encode(x, 4, matrix), 4)
    got, eight = quantize.decode(mixed, 8), quantize.decode(rows, 8)
    assert torch.equal(got[:, 1], eight[:, 1])  # the unchosen head keeps its 8-bit rows bit for bit
    assert (mixed.codes[:, heads].long() % 17 == 0).all()  # 4-bit code c as 8-bit code 17c
    step = quantize.encode(x, 4, matrix).params[..., 0].float().max()
    assert (got[:, heads] - low[:, heads]).abs().max() < 0.05 * step  # the float16 step / 17 rounds a little
    assert (got[:, heads] - x[:, heads]).abs().max() > 4 * (eight[:, heads] - x[:, heads]).abs().max()


def test_a_plan_s_slots_are_priced_at_the_mixed_widths(simulated, wide_policy):
    plan = compile_policy(wide_policy, 0.1, max_len=2048, kv_bits=8)
    whole, frequency = plan.has("full").bool(), plan.has("frequency").to(torch.int64)
    assert whole.any() and (~whole).any()
    capacity = plan.capacity.to(torch.int64)
    eight = {bits: capacity * slot_bytes(plan.head_dim, plan.target.dtype, bits, frequency) for bits in (4, 8)}
    assert simulated.mixed_bytes(plan, "whole") == int(eight[4][whole].sum() + eight[8][~whole].sum()) + plan.overhead_bytes
    assert simulated.mixed_bytes(plan, "snap") == int(eight[8][whole].sum() + eight[4][~whole].sum()) + plan.overhead_bytes
    window = plan.window.to(torch.int64)[~whole].sum()
    per_slot = slot_bytes(plan.head_dim, plan.target.dtype, 8, True) - slot_bytes(plan.head_dim, plan.target.dtype, 4, True)
    assert simulated.mixed_bytes(plan, "snap-prompt") == simulated.mixed_bytes(plan, "snap") + int(window) * per_slot
    assert simulated.mixed_bytes(plan, "snap") < plan.cache_bytes


def test_only_a_marked_plan_s_heads_are_rounded_and_snap_prompt_only_while_prefilling(simulated, wide_policy):
    plan = compile_policy(wide_policy, 0.1, max_len=2048, kv_bits=8)
    layer = int(plan.has("full").any(1).nonzero()[0])
    whole = plan.has("full")[layer].bool()
    assert simulated.low_bit_heads(plan, layer, "prefill") is None
    plan.notes[simulated.NOTE] = "whole"
    assert torch.equal(simulated.low_bit_heads(plan, layer, "extend"), whole)
    plan.notes[simulated.NOTE] = "snap-prompt"
    assert torch.equal(simulated.low_bit_heads(plan, layer, "prefill"), ~whole)
    assert simulated.low_bit_heads(plan, layer, "extend") is None
