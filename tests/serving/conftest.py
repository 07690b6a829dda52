"""Serving fixtures: the 25% plan of the embedded model that the demo serves (a real profile)."""

import pytest

from kvc.compiler import compile_policy

MAX_LEN = 1040  # the demo's: a passkey prompt of about 1,000 tokens and its answer


@pytest.fixture(scope="session")
def served_plan(passkey_policy):
    return compile_policy(passkey_policy, 0.25, max_len=MAX_LEN)


@pytest.fixture(scope="session")
def served_plan_file(served_plan, tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "quarter.plan"
    served_plan.save(path)
    return path
