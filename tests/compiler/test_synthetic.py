"""Synthetic policies: valid, reproducible, and shaped like measured ones."""

import numpy as np

from kvc.policies.kinds import FASTGEN_POLICIES
from kvc.policies.schema import Policy
from kvc.policies.synthetic import CURVE_POINTS, WINDOW_POINTS, synthetic_policy


def test_same_seed_same_policy_and_a_valid_round_trip(tmp_path):
    policy = synthetic_policy(4, 8, 4, 32, seed=3, vocab_size=500)
    assert policy.to_dict() == synthetic_policy(4, 8, 4, 32, seed=3, vocab_size=500).to_dict()
    assert policy.to_dict() != synthetic_policy(4, 8, 4, 32, seed=4, vocab_size=500).to_dict()
    assert Policy.load(policy.save(tmp_path / "p.yaml")).to_dict() == policy.to_dict()


def test_curves_follow_the_profiler_contract():
    policy = synthetic_policy(8, 16, 4, 64, seed=0)
    for layer in policy.layers:
        for head in layer.heads:
            assert set(head.curves) == {"local", "frequency", "special+local", "special+punct+frequency",
                                        "special+punct+frequency+local"}
            assert set(head.window_curves) == {"local", "special+local"}
            for curve in [*head.curves.values(), *head.window_curves.values()]:
                assert curve.points in (CURVE_POINTS, [float(w) for w in WINDOW_POINTS])
                assert curve.recovery == sorted(curve.recovery) and 0 <= curve.recovery[0] and curve.recovery[-1] <= 1
            values = [head.fastgen[k] for k in FASTGEN_POLICIES]
            assert values == sorted(values) and head.fastgen["full"] == 1.0
            assert head.kind == next(k for k in FASTGEN_POLICIES if head.fastgen[k] >= policy.profile.threshold)
            assert head.recovery == head.fastgen[head.kind]


def test_lower_layers_are_broader_and_some_heads_need_everything():
    policy = synthetic_policy(32, 32, 8, 128, seed=0)
    funnel = np.array([layer.funnel for layer in policy.layers])
    assert funnel[:8].mean() > 2 * funnel[-8:].mean()
    kinds = [head.kind for layer in policy.layers for head in layer.heads]
    assert 0 < kinds.count("full") < len(kinds) / 2
    assert len(set(kinds)) >= 3
