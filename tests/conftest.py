"""Shared fixtures: the embedded model, loaded once per test session; the `gpu` marker."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if "gpu" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if "gpu" not in item.keywords]


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct in float32 on CPU: (model, tokenizer, source, fingerprint)."""
    from kvc import models

    return models.load("smollm2-135m", dtype="float32", device="cpu")
