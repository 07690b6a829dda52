"""Keep-set recovery from probe rows: every config against `keep.keep_set`, with and without ties."""

import pytest
import torch

from kvc.policies.keep import frequency_keep, keep_set
from kvc.profiler.measures import Ratios
from kvc.profiler.recovery import (
    funnel_fractions,
    keep_table,
    recoveries,
    table_configs,
    top_keys,
)


def probe_rows(owners, lengths, width, tied, seed=0):
    """Attention rows and scores (owners, P, width), zero past each prefix; tied scores are small integers."""
    generator = torch.Generator().manual_seed(seed)
    lengths_tensor = torch.tensor(lengths)
    in_prefix = torch.arange(width)[None, :] < lengths_tensor[:, None]
    rows = torch.rand(owners, len(lengths), width, generator=generator, dtype=torch.float64) ** 4 * in_prefix
    rows = rows / rows.sum(-1, keepdim=True)
    if tied:
        scores = torch.randint(1, 6, (owners, len(lengths), width), generator=generator).double()
    else:
        scores = torch.rand(owners, len(lengths), width, generator=generator, dtype=torch.float64) + 0.01
    return rows, scores * in_prefix, in_prefix


def expected_recoveries(rows, scores, is_special, is_punct, lengths, ratios):
    """Recovery of every config, one keep_set call at a time."""
    owners = rows.shape[0]
    table = torch.zeros(owners, len(lengths), len(table_configs(lengths[0], ratios)), dtype=torch.float64)
    for probe, length in enumerate(lengths):
        classes = (is_special[:length].expand(owners, -1), is_punct[:length].expand(owners, -1))
        for column, (kind, budget) in enumerate(table_configs(length, ratios)):
            keep = keep_set(kind, *classes, scores[:, probe, :length], budget)
            table[:, probe, column] = (rows[:, probe, :length] * keep).sum(-1)
    return table


@pytest.mark.parametrize("tied", [False, True], ids=["distinct-scores", "tied-scores"])
def test_every_config_recovers_what_keep_set_keeps(tied):
    ratios = Ratios()
    lengths, width = [5, 17, 40, 64, 64, 33], 64
    rows, scores, in_prefix = probe_rows(3, lengths, width, tied)
    generator = torch.Generator().manual_seed(1)
    is_special = torch.rand(width, generator=generator) < 0.1
    is_punct = (torch.rand(width, generator=generator) < 0.2) & ~is_special
    positions = torch.arange(width)
    special = (is_special | (positions < ratios.sinks))[None, :] & in_prefix
    key_class = special.long() + 2 * (is_punct[None, :] & in_prefix & ~special).long()
    measured = recoveries(rows, scores, key_class, keep_table(tuple(lengths), ratios))
    expected = expected_recoveries(rows, scores, is_special, is_punct, lengths, ratios)
    assert torch.allclose(measured, expected, atol=1e-12)


def test_top_keys_break_ties_like_frequency_keep():
    lengths, width = [5, 11, 20, 17], 20
    _, scores, _ = probe_rows(3, lengths, width, tied=True)
    heavy = torch.tensor([[1, 3, 5], [2, 6, 11], [1, 7, 20], [0, 4, 9]])
    kept = top_keys(scores, heavy)
    for owner in range(3):
        for probe, length in enumerate(lengths):
            for column in range(3):
                expected = frequency_keep(scores[owner, probe, :length], int(heavy[probe, column]))
                assert torch.equal(kept[owner, probe, :length, column], expected)
                assert not kept[owner, probe, length:, column].any()


def test_funnel_counts_the_fewest_keys_carrying_each_level():
    attention = torch.tensor([[[0.125, 0.5, 0.25, 0.125, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0, 0.0]]])
    fractions = funnel_fractions(attention, torch.tensor([4, 4]))
    # levels 0.5, 0.8, 0.9, 0.95, 0.99 over a prefix of 4 keys
    assert fractions[0, 0].tolist() == [0.25, 0.75, 1.0, 1.0, 1.0]
    assert fractions[0, 1].tolist() == [0.5, 1.0, 1.0, 1.0, 1.0]
