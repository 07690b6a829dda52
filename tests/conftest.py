"""Shared fixtures: the embedded model (loaded once per session), a small hand-made policy, a real
profile computed once per test run; the `gpu` marker."""

import os

# Triton reads this when kernels are imported: set it before any test imports kvc.runtime.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from run_once import computed_once  # noqa: E402

from kvc.policies.schema import (Curve, HeadProfile, LayerProfile, ModelInfo, Policy, ProfileInfo,  # noqa: E402
                                QueryHeadProfile, TokenSets, load_policy, save_policy)

POINTS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]


# Under pytest-xdist (`make test` runs `pytest -n`) each worker takes its share of the cores: two
# workers each running torch on every core would only take turns.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))


def pytest_collection_modifyitems(config, items):
    # The `long` tests first: their workers start them at once and the other workers run the rest
    # beside them, rather than everyone waiting for them at the end (the sort keeps the order otherwise).
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
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


def make_policy(num_layers=3, num_kv_heads=2, group=2, kinds=("special+punct", "full")) -> Policy:
    layers = []
    for layer in range(num_layers):
        heads = []
        for head in range(num_kv_heads):
            kind = kinds[(layer + head) % len(kinds)]
            heads.append(HeadProfile(
                index=head, kind=kind, components=kind.split("+"), recovery=0.9 + 0.01 * head,
                fastgen={"special": 0.5, "special+punct": 0.91, "full": 1.0},
                curves={"local": Curve(POINTS, [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0])},
                window_curves={"local": Curve([16, 64], [0.4, 0.6])},
                sink_mass=0.3, punct_fraction=0.08, special_fraction=0.01,
                query_heads=[QueryHeadProfile(index=head * group + q, kind=kind, recovery=0.9, sink_mass=0.25)
                             for q in range(group)],
            ))
        layers.append(LayerProfile(index=layer, funnel=0.5 - 0.1 * layer, heads=heads,
                                   funnel_curve=Curve([0.5, 0.9], [0.1, 0.4])))
    return Policy(
        model=ModelInfo(name="tiny", fingerprint="sha256:0123456789abcdef", num_layers=num_layers,
                        num_attention_heads=num_kv_heads * group, num_kv_heads=num_kv_heads, head_dim=16),
        profile=ProfileInfo(prompt_set="builtin", prompt_count=2, token_counts=[300, 500], prompt_hash="abc",
                            threshold=0.95, probe_scheme="last 32 + 32 sampled", dtype="float32", device="cpu",
                            seconds=1.5),
        tokens=TokenSets(special=[0, 1, 2], punctuation=[13, 30]),
        layers=layers,
        kvc_version="0.1.0",
        created="2026-11-23T10:00:00+00:00",
    )


@pytest.fixture
def policy():
    return make_policy()


@pytest.fixture(scope="session")
def policy_factory():
    return make_policy


QUARTER_PROFILED = ("document-lighthouse-story", "code-python-review", "table-inventory")  # 4,047 tokens


@pytest.fixture(scope="session")
def passkey_policy(smollm, tmp_path_factory):
    """A real profile of the embedded model on three built-in prompts: its plans at 25% answer passkeys."""
    from kvc.profiler import load_prompts, profile_model
    from kvc.profiler.prompts import PromptSet

    def profile():
        builtin = load_prompts("builtin")
        prompts = PromptSet("builtin-3", tuple(p for p in builtin.prompts if p.name in QUARTER_PROFILED))
        with torch.inference_mode():
            return profile_model(smollm, prompts)

    return computed_once(tmp_path_factory, "passkey-policy.yaml", profile, save_policy, load_policy)



@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm):
    """A model folder (config, random weights, the embedded model's tokenizer) of a 2-layer Llama with
    2 KV heads: loads and profiles in a second, for commands run as the user runs them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-model")
    config = LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smollm.tokenizer.save_pretrained(folder)
    return folder
