"""Every head kind's keep-set on hand-made inputs, and the kind vocabulary."""

import pytest
import torch

from kvc.policies.errors import KvcError
from kvc.policies.keep import keep_set
from kvc.policies.kinds import FASTGEN_POLICIES, Budget, canonical_kind, kind_code, kind_components

# positions:      0  1  2  3  4  5  6  7  8  9
SPECIAL = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
PUNCT = torch.tensor([0, 0, 1, 0, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
SCORES = torch.tensor([9.0, 0.1, 0.2, 5.0, 0.3, 0.4, 7.0, 0.5, 0.6, 0.7])
BUDGET = Budget(sinks=2, window=3, heavy=2)


def positions(mask):
    return torch.nonzero(mask).flatten().tolist()


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("special", [0, 1, 5]),
        ("punct", [2, 7]),
        ("local", [7, 8, 9]),
        ("frequency", [0, 6]),
        ("full", list(range(10))),
        ("special+punct", [0, 1, 2, 5, 7]),
        ("special+punct+frequency", [0, 1, 2, 5, 6, 7]),
        ("special+punct+frequency+local", [0, 1, 2, 5, 6, 7, 8, 9]),
        ("special+local", [0, 1, 5, 7, 8, 9]),
    ],
)
def test_keep_sets(kind, expected):
    assert positions(keep_set(kind, SPECIAL, PUNCT, SCORES, BUDGET)) == expected


def test_fastgen_policies_are_nested():
    sets = [set(positions(keep_set(kind, SPECIAL, PUNCT, SCORES, BUDGET))) for kind in FASTGEN_POLICIES]
    assert all(a <= b for a, b in zip(sets, sets[1:]))


def test_frequency_ties_prefer_the_earlier_position():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0])
    assert positions(keep_set("frequency", SPECIAL[:4], PUNCT[:4], scores, Budget(heavy=2))) == [1, 2]


def test_batched_inputs_keep_per_row():
    special = torch.zeros(2, 5, dtype=torch.bool)
    scores = torch.tensor([[5.0, 1, 1, 1, 1], [1, 1, 1, 1, 5.0]])
    keep = keep_set("frequency", special, special, scores, Budget(heavy=1))
    assert keep.tolist() == [[True, False, False, False, False], [False, False, False, False, True]]


def test_budgets_larger_than_the_prefix_keep_everything():
    keep = keep_set("frequency+local", SPECIAL, PUNCT, SCORES, Budget(window=50, heavy=50))
    assert bool(keep.all())


def test_frequency_needs_scores():
    with pytest.raises(KvcError, match="needs attention scores"):
        keep_set("frequency", SPECIAL, PUNCT, None, BUDGET)


@pytest.mark.parametrize("bad, message", [("loacl", "unknown kind 'loacl'"), ("", "non-empty"),
                                          ("local+local", "twice"), ("full+local", "takes no other")])
def test_bad_kinds(bad, message):
    with pytest.raises(KvcError, match=message):
        kind_components(bad)


def test_canonical_order_and_codes():
    assert canonical_kind(["local", "special"]) == "special+local"
    assert kind_code("special+punct") == 3
    assert kind_code("full") == 16
    assert kind_code("frequency+local") == 12
