"""Profiling the embedded model: agreement with the eager reference, monotone and deterministic
policies, the model's output left as it was, and nothing changed or written on interruption."""

import pytest
import torch

from kvc.policies.kinds import FASTGEN_POLICIES
from kvc.policies.schema import load_policy
from kvc.profiler import profile_model, summarise
from kvc.profiler.capture import capturing
from kvc.policies.probes import RECONSTRUCT_PROMPT
from kvc.profiler.context_probe import SCORE_POINTS
from kvc.profiler.measures import CURVE_POINTS, WINDOW_POINTS, Ratios
from kvc.profiler.profile import StatisticsObserver, TokenizedPrompt, summary_lines
from kvc.profiler.prompts import Prompt, PromptSet
from kvc.profiler.reference import reference_attention


@pytest.fixture(scope="module")
def ledger(story_prompts):
    """One text prompt of about 220 tokens: a story told twice, so it has copy events."""
    story = story_prompts.prompts[0].text
    return PromptSet("story", (Prompt("ledger", text=story + "\n\nOnce more: " + story),))


@pytest.fixture(scope="module")
def story_policy(smollm, ledger):
    return profile_model(smollm, ledger)


def head_numbers(head):
    """Every measured number of a KV head, named."""
    numbers = {f"fastgen.{k}": v for k, v in head.fastgen.items()}
    for group in ("curves", "window_curves"):
        for kind, curve in getattr(head, group).items():
            numbers.update({f"{group}.{kind}[{i}]": r for i, r in enumerate(curve.recovery)})
    numbers["sink_mass"] = head.sink_mass
    numbers["retrieval"] = head.retrieval
    for query in head.query_heads:
        numbers.update({f"q{query.index}.fastgen.{k}": v for k, v in query.fastgen.items()})
        numbers[f"q{query.index}.sink_mass"] = query.sink_mass
        numbers[f"q{query.index}.retrieval"] = query.retrieval
    return numbers


def test_recovery_matches_the_eager_reference(smollm, story_policy, ledger):
    reference = profile_model(smollm, ledger, attention=reference_attention)
    worst = 0.0
    for layer, expected_layer in zip(story_policy.layers, reference.layers):
        assert layer.funnel == pytest.approx(expected_layer.funnel, abs=1e-4)
        for head, expected in zip(layer.heads, expected_layer.heads):
            measured, exact = head_numbers(head), head_numbers(expected)
            worst = max(worst, max(abs(measured[name] - exact[name]) for name in exact))
            assert head.kind == expected.kind or abs(head.recovery - expected.recovery) < 1e-4
    assert worst < 1e-4


def test_tables_and_curves_are_monotone(story_policy):
    for layer in story_policy.layers:
        assert layer.funnel_curve.recovery == sorted(layer.funnel_curve.recovery)
        for head in layer.heads:
            assert [head.fastgen[p] for p in FASTGEN_POLICIES] == sorted(head.fastgen.values())
            assert head.fastgen["full"] == 1.0 and head.recovery == head.fastgen[head.kind]
            for curve in [*head.curves.values(), *head.window_curves.values()]:
                assert curve.recovery == sorted(curve.recovery)
            for query in head.query_heads:
                assert [query.fastgen[p] for p in FASTGEN_POLICIES] == sorted(query.fastgen.values())


def test_the_policy_follows_the_contract(story_policy, tmp_path):
    policy = story_policy
    assert len(policy.layers) == 30 and all(len(layer.heads) == 3 for layer in policy.layers)
    threshold = policy.profile.threshold
    for layer in policy.layers:
        assert 0 < layer.funnel <= 1 and layer.funnel_curve.points == [0.5, 0.8, 0.9, 0.95, 0.99]
        for head in layer.heads:
            cheapest = next(p for p in FASTGEN_POLICIES if head.fastgen[p] >= threshold)
            assert head.kind == cheapest
            assert set(head.curves) == {"local", "frequency", "special+local", "special+punct+frequency",
                                        "special+punct+frequency+local"}
            assert all(curve.points == list(CURVE_POINTS) for curve in head.curves.values())
            assert set(head.window_curves) == {"local", "special+local"}
            assert all(curve.points == list(WINDOW_POINTS) for curve in head.window_curves.values())
            assert [q.index for q in head.query_heads] == [3 * head.index + j for j in range(3)]
            assert head.sink_mass == pytest.approx(sum(q.sink_mass for q in head.query_heads) / 3, abs=2e-6)
            assert 0 < head.special_fraction < 1 and 0 < head.punct_fraction < 1
            assert head.retrieval == max(q.retrieval for q in head.query_heads)
    profile = policy.profile
    assert profile.prompt_set == "story" and profile.prompt_count == 1 and len(profile.token_counts) == 1
    assert profile.prompt_hash.startswith("sha256:") and "last 32 queries" in profile.probe_scheme
    assert profile.copy_events > 50 and "copy events" in profile.retrieval_scheme
    assert profile.dtype == "float32" and profile.device == "cpu" and profile.seconds > 0
    assert policy.tokens.special and policy.tokens.punctuation
    saved = policy.save(tmp_path / "policy.yaml")
    assert load_policy(saved).to_dict() == policy.to_dict()


def test_retrieval_finds_the_heads_that_copy_a_passkey(story_policy):
    """The KV heads that carry a passkey into the answer on this model (measured with the full cache:
    L17 KV1 and L18 KV2 put 0.56 and 0.49 of their attention on the key's digits) score highest."""
    scores = {(layer.index, head.index): head.retrieval for layer in story_policy.layers for head in layer.heads}
    top = sorted(scores, key=scores.get, reverse=True)[:4]
    assert {(17, 1), (18, 2)} <= set(top), top


def test_profiling_is_deterministic(smollm, story_policy, ledger):
    again = profile_model(smollm, ledger).to_dict()
    first = story_policy.to_dict()
    for policy in (first, again):
        policy.pop("created")
        policy["profile"].pop("seconds")
    assert again == first


def test_the_models_output_is_unchanged(smollm, ledger):
    model = smollm.model
    token_ids = smollm.tokenizer(ledger.prompts[0].text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        plain = model.base_model(token_ids, use_cache=False).last_hidden_state
        observer = StatisticsObserver(30, [0], [13], Ratios())
        with capturing(model, observer):
            observer.start(TokenizedPrompt("story", token_ids[0]))
            captured = model.base_model(token_ids, use_cache=False).last_hidden_state
    assert model.config._attn_implementation == "sdpa" and observer.layers_seen == 30
    assert torch.allclose(captured, plain, atol=1e-4)


def test_an_interruption_restores_the_model_and_returns_nothing(smollm, ledger):
    steps = []

    def interrupt(name):
        steps.append(name)
        if len(steps) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_model(smollm, ledger, progress=interrupt)
    assert smollm.model.config._attn_implementation == "sdpa"


def test_long_prompts_are_cut_with_a_warning_or_refused(smollm, ledger):
    from kvc.policies.errors import KvcError

    prompts = ledger
    warnings = []
    policy = profile_model(smollm, prompts, max_tokens=40, warn=warnings.append)
    assert policy.profile.token_counts == [40]
    assert len(warnings) == 1 and "'ledger'" in warnings[0] and "40" in warnings[0]
    with pytest.raises(KvcError, match="'ledger' has .* tokens, more than the limit of 40"):
        profile_model(smollm, prompts, max_tokens=40, strict=True)
    for threshold in (0.0, 1.5, -0.1):
        with pytest.raises(KvcError, match="--threshold"):
            profile_model(smollm, prompts, threshold=threshold)


def test_summary(story_policy):
    summary = summarise(story_policy)
    assert sum(summary.kinds.values()) == 90 and 0 < summary.mean_recovery <= 1
    assert 0 < summary.kept_bytes <= summary.full_bytes
    assert summary.full_bytes == 90 * summary.length * 2 * 64 * 4
    lines = summary_lines(summary)
    assert "KV heads per FastGen choice" in lines[0] and "saved" in lines[2]


def test_the_embedded_policy_has_a_probe_curve_for_every_head(story_policy, tmp_path):
    assert repr(RECONSTRUCT_PROMPT) in story_policy.profile.context_probe_scheme
    for layer in story_policy.layers:
        for head in layer.heads:
            curve = head.probe_curve
            assert curve.points == list(SCORE_POINTS)
            assert curve.recovery == sorted(curve.recovery, reverse=True)  # fewer keys reach a higher score
            assert curve.recovery[0] == 1.0 and 0.0 <= curve.recovery[-1] < 1.0
    # Heads differ in how many keys they hold on to: what the compiler's budgets follow.
    middle = SCORE_POINTS.index(0.01)
    shares = [head.probe_curve.recovery[middle] for layer in story_policy.layers for head in layer.heads]
    assert max(shares) - min(shares) > 0.3
    again = load_policy(story_policy.save(tmp_path / "policy.yaml"))
    assert again.layers[3].heads[1].probe_curve == story_policy.layers[3].heads[1].probe_curve
