"""Synthetic policies for the compiler tests: small enough to compile in milliseconds."""

import pytest

from kvc.policies.synthetic import synthetic_policy


@pytest.fixture(scope="session")
def small_policy():
    """6 layers x 2 KV heads (GQA group of 4), head dim 16, up to 4096 positions."""
    return synthetic_policy(6, 8, 2, 16, seed=1, max_position_embeddings=4096, vocab_size=1000)


@pytest.fixture(scope="session")
def wide_policy():
    """24 layers x 4 KV heads: enough heads for the greedy to be near optimal."""
    return synthetic_policy(24, 16, 4, 64, seed=2, max_position_embeddings=32768, vocab_size=5000)


@pytest.fixture
def policy_file(tmp_path, small_policy):
    return small_policy.save(tmp_path / "policy.yaml")
