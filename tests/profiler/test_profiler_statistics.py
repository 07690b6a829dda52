"""The blockwise attention pass against the exact eager reference, on synthetic heads."""

import pytest
import torch

from kvc.profiler import statistics
from kvc.profiler.measures import (
    COPY_MIN_DISTANCE,
    FIRST_SAMPLED_POSITION,
    RECENT_PROBES,
    SAMPLED_PROBES,
    copy_events,
    probe_positions,
)
from kvc.profiler.reference import reference_attention
from kvc.profiler.statistics import measured_attention

FIELDS = ("query_fastgen", "kv_fastgen", "curves", "window_curves", "sink_mass", "funnel")


def synthetic_layer(heads, kv_heads, length, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(heads, length, dim, generator=generator) * 2
    key = torch.randn(kv_heads, length, dim, generator=generator) * 2
    value = torch.randn(kv_heads, length, dim, generator=generator)
    token_ids = torch.randint(0, 1000, (length,), generator=generator)
    is_special = torch.rand(length, generator=generator) < 0.03
    is_punct = torch.rand(length, generator=generator) < 0.12
    return query, key, value, probe_positions(token_ids), is_special, is_punct


def synthetic_copies(length, seed=0):
    """Copy events of random tokens whose first tokens repeat at the end, far enough back."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, 10_000, (length,), generator=generator)
    repeated = min(40, length - COPY_MIN_DISTANCE - 2)
    token_ids[-repeated:] = token_ids[:repeated]
    events = copy_events(token_ids)
    assert len(events) > 0
    return events


def sliding_mask(length, window, boolean=True):
    rows, columns = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (columns <= rows) & (columns > rows - window)
    if boolean:
        return allowed[None, None]
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def assert_agree(measured, reference, tolerance=1e-6):
    assert measured.probes == reference.probes
    for field in FIELDS:
        difference = (getattr(measured, field) - getattr(reference, field)).abs().max().item() / measured.probes
        assert difference < tolerance, field
    assert measured.special_fraction == pytest.approx(reference.special_fraction, abs=1e-9)
    assert measured.punct_fraction == pytest.approx(reference.punct_fraction, abs=1e-9)
    assert measured.copy_events == reference.copy_events
    assert (measured.copy_mass - reference.copy_mass).abs().max().item() < 1e-6 * max(1, measured.copy_events)


@pytest.mark.parametrize("heads, kv_heads, length", [(4, 4, 90), (6, 2, 300), (8, 1, 150)])
def test_blockwise_statistics_match_the_reference(heads, kv_heads, length):
    query, key, value, probes, is_special, is_punct = synthetic_layer(heads, kv_heads, length)
    copies = synthetic_copies(length)
    output, measured = measured_attention(query, key, value, None, 0.25, probes, is_special, is_punct, copies=copies)
    expected_output, reference = reference_attention(query, key, value, None, 0.25, probes, is_special, is_punct,
                                                     copies=copies)
    assert_agree(measured, reference)
    assert measured.copy_mass.shape == (heads,) and (measured.copy_mass > 0).all()
    assert torch.allclose(output, expected_output, atol=1e-5)


@pytest.mark.parametrize("boolean", [True, False], ids=["bool-mask", "additive-mask"])
def test_a_models_mask_is_honoured(boolean):
    query, key, value, probes, is_special, is_punct = synthetic_layer(4, 2, 120)
    mask = sliding_mask(120, 20, boolean)
    copies = synthetic_copies(120)
    output, measured = measured_attention(query, key, value, mask, 0.25, probes, is_special, is_punct, copies=copies)
    expected_output, reference = reference_attention(query, key, value, mask, 0.25, probes, is_special, is_punct,
                                                     copies=copies)
    assert_agree(measured, reference)
    assert torch.allclose(output, expected_output, atol=1e-5)
    local = measured.window_curves[:, 0, 0] / measured.probes  # local, 16 tokens
    wide = measured.window_curves[:, 0, 1] / measured.probes  # local, 64 tokens >= the 20-token window
    assert (local < 0.999).all() and torch.allclose(wide, torch.ones_like(wide))
    assert measured.copy_mass.abs().max() == 0  # every source lies outside the 20-token window


def test_the_output_is_sdpa_attention():
    query, key, value, probes, is_special, is_punct = synthetic_layer(6, 2, 200)
    output, _ = measured_attention(query, key, value, None, 0.25, probes, is_special, is_punct)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query[None], key.repeat_interleave(3, 0)[None], value.repeat_interleave(3, 0)[None], is_causal=True, scale=0.25,
    )[0].transpose(0, 1)
    assert output.shape == (200, 6, 16) and torch.allclose(output, expected, atol=1e-5)


def test_blocks_do_not_change_the_result(monkeypatch):
    query, key, value, probes, is_special, is_punct = synthetic_layer(4, 2, 160)
    copies = synthetic_copies(160)
    output, whole = measured_attention(query, key, value, None, 0.25, probes, is_special, is_punct, copies=copies)
    monkeypatch.setattr(statistics, "BLOCK_ROWS", 7)
    blocked_output, blocked = measured_attention(query, key, value, None, 0.25, probes, is_special, is_punct,
                                                 copies=copies)
    assert_agree(blocked, whole, tolerance=1e-9)
    assert torch.allclose(output, blocked_output, atol=1e-6)


def test_raw_tables_and_curves_are_monotone():
    query, key, value, probes, is_special, is_punct = synthetic_layer(6, 3, 250, seed=3)
    _, stats = measured_attention(query, key, value, None, 0.25, probes, is_special, is_punct)
    for table in (stats.query_fastgen, stats.kv_fastgen):
        assert (table.diff(dim=-1) >= -1e-9).all()
    assert (stats.curves.diff(dim=-1) >= -1e-9).all()
    assert (stats.window_curves.diff(dim=-1) >= -1e-9).all()
    assert (stats.funnel.diff(dim=-1) >= 0).all()


def test_probe_scheme():
    token_ids = torch.arange(500)
    probes = probe_positions(token_ids)
    assert torch.equal(probes, probe_positions(token_ids.clone()))
    assert len(probes) == RECENT_PROBES + SAMPLED_PROBES and len(set(probes.tolist())) == len(probes)
    assert probes[-RECENT_PROBES:].tolist() == list(range(500 - RECENT_PROBES, 500))
    assert (probes[:SAMPLED_PROBES] >= FIRST_SAMPLED_POSITION).all()
    assert not torch.equal(probes, probe_positions(token_ids + 1))  # seeded by the tokens
    assert probe_positions(torch.arange(20)).tolist() == list(range(20))


def test_copy_events_by_definition():
    filler = list(range(100, 100 + COPY_MIN_DISTANCE))
    token_ids = torch.tensor([1, 2, 3, 4] + filler + [1, 2, 3, 4, 1, 2, 3, 9])
    events = copy_events(token_ids).tolist()
    second = 4 + len(filler)
    # "1 2 3" again at second..second+2 predicts 4, copied from position 3, far enough back
    assert events == [[second + 2, 3]]
    # the third "1 2 3" is 4 tokens after the second (too close) and is followed by 9, not 4
    assert copy_events(torch.arange(50)).shape == (0, 2)
    assert copy_events(torch.tensor([5])).shape == (0, 2)
