"""compile_policy: requests checked with one clear error, plans that round-trip and know their model."""

import copy
import json
import time

import pytest
import torch

import kvc
from kvc.compiler import compile_policy
from kvc.compiler.compile import DEFAULT_KV_BITS, MERGE_SIMILARITY, deployment_for
from kvc.compiler.options import head_options, window_curve
from kvc.plan import Plan, check_kv_bits
from kvc.policies.errors import KvcError
from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0.2, "memory": "1GiB"}, "not both"),
    ({"target": 0}, r"in \(0, 1\]"),
    ({"target": -0.5}, r"in \(0, 1\]"),
    ({"target": 1.5}, r"in \(0, 1\]"),
    ({"target": float("nan")}, r"in \(0, 1\]"),
    ({"memory": "2XB"}, "not a size"),
    ({"memory": "-1GiB"}, "must be positive"),
    ({"memory": 0}, "must be positive"),
    ({"max_len": 8192}, "above synthetic-6x2's limit of 4096"),
    ({"max_len": 0}, "positive number of tokens"),
    ({"batch": 0}, "positive number of sequences"),
    ({"dtype": "int4"}, "unknown cache dtype"),
    ({"strategy": "h2o"}, "unknown strategy 'h2o'"),
    ({"kv_bits": 3}, "--kv-bits: expected one of 2, 4, 8"),
    ({"kv_bits": True}, "--kv-bits: expected one of 2, 4, 8"),
    ({"merge_similarity": 2}, r"--merge-similarity: 2 is outside \[-1.0, 1.0\]"),
    ({"merge_similarity": float("nan")}, "--merge-similarity: expected a finite number"),
    ({"merge_similarity": "nan"}, "--merge-similarity: expected a finite number"),
    ({"merge_similarity": "always"}, "--merge-similarity: expected auto, off or a cosine similarity in \\[-1, 1\\], "
                                     "got 'always'"),
])
def test_bad_requests_are_one_clear_error(small_policy, kwargs, message):
    with pytest.raises(KvcError, match=message):
        compile_policy(small_policy, **kwargs)


@pytest.mark.parametrize("strategy", ["knapsack", "fastgen", "pyramid", "uniform"])
def test_a_target_below_the_minimum_says_what_the_minimum_is(small_policy, strategy):
    with pytest.raises(KvcError, match=f"smallest plan the {strategy} strategy") as raised:
        compile_policy(small_policy, 1e-5, max_len=4096, strategy=strategy)
    message = str(raised.value)
    suggested = float(message.split("--target ")[1].split()[0])
    minimum = int(message.split("--memory ")[1])
    assert compile_policy(small_policy, suggested, max_len=4096, strategy=strategy).cache_bytes <= minimum
    assert compile_policy(small_policy, memory=minimum, max_len=4096, strategy=strategy).cache_bytes == minimum
    with pytest.raises(KvcError, match="below the smallest plan"):
        compile_policy(small_policy, memory=minimum - 1, max_len=4096, strategy=strategy)


def test_memory_is_the_same_question_in_bytes(small_policy):
    by_fraction = compile_policy(small_policy, 0.25, max_len=4096, batch=8)
    by_memory = compile_policy(small_policy, memory=by_fraction.target.budget_bytes, max_len=4096, batch=8)
    assert torch.equal(by_fraction.capacity, by_memory.capacity)
    assert by_memory.target.fraction == pytest.approx(0.25)
    assert compile_policy(small_policy, memory="2MiB", max_len=4096).target.budget_bytes == 2 * 2**20


def test_defaults_are_a_quarter_of_the_models_context_in_bf16(small_policy):
    plan = compile_policy(small_policy)
    assert (plan.target.max_len, plan.target.batch, plan.target.dtype, plan.target.fraction) == (4096, 1, "bfloat16", 0.25)


def test_a_policy_without_a_context_length_needs_max_len(small_policy):
    policy = copy.deepcopy(small_policy)
    policy.model.max_position_embeddings = 0
    with pytest.raises(KvcError, match="give --max-len"):
        compile_policy(policy)
    assert compile_policy(policy, max_len=100_000).target.max_len == 100_000


def test_plan_round_trips_and_loads_fast(tmp_path, small_policy):
    plan = compile_policy(small_policy, 0.2, max_len=4096, batch=2, dtype="fp32")
    path = plan.save(tmp_path / "small.plan")
    started = time.perf_counter()
    loaded = Plan.load(path)
    assert time.perf_counter() - started < 0.5
    assert loaded.header() == plan.header()
    for name, tensor in plan.tensors().items():
        assert torch.equal(tensor, loaded.tensors()[name]), name
    assert loaded.cache_bytes == plan.cache_bytes and torch.equal(loaded.offsets, plan.offsets)


def test_low_bit_rows_hold_more_tokens_in_the_same_bytes(tmp_path, small_policy):
    plain = compile_policy(small_policy, 0.25, max_len=2048, kv_bits=0)
    low = compile_policy(small_policy, 0.25, max_len=2048, kv_bits=4)
    assert compile_policy(small_policy, 0.25, max_len=2048).kv_bits == DEFAULT_KV_BITS == 8
    # head dim 16 in bf16: 32-byte rows against 8 bytes of codes + 4 of group parameters; slots add positions, scores
    assert low.kv_bits == 4 and low.cache_bytes <= low.target.budget_bytes
    assert int(low.capacity.sum()) > 2 * int(plain.capacity.sum())
    assert low.kv_bytes == int(low.capacity.sum()) * 2 * (8 + 4)
    assert Plan.load(low.save(tmp_path / "low.plan")).kv_bits == 4


def test_a_plan_written_before_low_bit_rows_loads_with_rows_in_its_dtype(tmp_path, small_policy):
    from safetensors.torch import save

    plan = compile_policy(small_policy, 0.25, max_len=2048, kv_bits=0)
    header = plan.header()
    del header["kv_bits"]
    path = tmp_path / "older.plan"
    path.write_bytes(save(plan.tensors(), metadata={"kvc_plan": json.dumps(header)}))
    older = Plan.load(path)
    assert older.kv_bits == 0 and older.cache_bytes == plan.cache_bytes


@pytest.mark.parametrize("options, merging", [
    ({"target": 0.25}, None),  # above MERGE_BY_DEFAULT_AT evicted tokens are dropped
    ({"target": 0.1}, MERGE_SIMILARITY),  # at it or below the retrieval strategy merges
    ({"target": 0.05}, MERGE_SIMILARITY),
    ({"target": 0.1, "merge_similarity": "off"}, None),
    ({"target": 0.1, "merge_similarity": None}, None),
    ({"target": 0.1, "strategy": "uniform"}, None),  # SnapKV as published drops them
    ({"target": 0.25, "merge_similarity": "0.3"}, 0.3),
    ({"target": 0.25, "merge_similarity": -1}, -1.0),
])
def test_merging_is_on_by_default_only_for_retrieval_plans_at_tight_budgets(small_policy, options, merging):
    assert compile_policy(small_policy, max_len=2048, **options).merge_similarity == merging


def test_plans_merge_evicted_tokens_when_asked_and_older_plans_do_not(tmp_path, small_policy):
    from safetensors.torch import save

    plan = compile_policy(small_policy, 0.25, max_len=2048, merge_similarity=0.5)
    assert plan.merge_similarity == 0.5
    assert Plan.load(plan.save(tmp_path / "merged.plan")).merge_similarity == 0.5
    header = plan.header()
    del header["merge_similarity"]  # a plan written before merging
    path = tmp_path / "older.plan"
    path.write_bytes(save(plan.tensors(), metadata={"kvc_plan": json.dumps(header)}))
    assert Plan.load(path).merge_similarity is None


def test_a_plan_with_a_bad_bit_width_is_refused(tmp_path, small_policy):
    plan = compile_policy(small_policy, 0.25, max_len=2048)
    plan.kv_bits = 5
    with pytest.raises(KvcError, match="kv_bits: expected one of 2, 4, 8"):
        Plan.load(plan.save(tmp_path / "bad.plan"))
    with pytest.raises(KvcError, match="head dim of 6 does not pack"):
        check_kv_bits(2, 6)


def test_compiling_is_deterministic(tmp_path, small_policy):
    first = compile_policy(small_policy, 0.1, max_len=4096).save(tmp_path / "a.plan")
    second = compile_policy(small_policy, 0.1, max_len=4096).save(tmp_path / "b.plan")
    assert first.read_bytes() == second.read_bytes()


def test_the_plan_carries_the_models_fingerprint(small_policy):
    from kvc.policies.synthetic import synthetic_policy

    plan = kvc.compile_policy(small_policy, 0.2)
    assert plan.fingerprint == small_policy.model.fingerprint
    plan.check_model(small_policy.model.fingerprint)
    other = synthetic_policy(6, 8, 2, 16, seed=9, max_position_embeddings=4096, vocab_size=1000)
    assert other.model.fingerprint != plan.fingerprint
    with pytest.raises(KvcError, match="compiled for synthetic-6x2"):
        plan.check_model(other.model.fingerprint)


def test_token_classes_come_from_the_policy(small_policy):
    plan = compile_policy(small_policy, 0.2)
    assert plan.token_classes.shape == (small_policy.model.vocab_size,)
    assert (plan.token_classes[small_policy.tokens.special] & SPECIAL_BIT).all()
    assert (plan.token_classes[small_policy.tokens.punctuation] & PUNCT_BIT).all()
    assert int((plan.token_classes != 0).sum()) == len(set(small_policy.tokens.special) | set(small_policy.tokens.punctuation))


def test_token_ids_outside_the_vocabulary_are_refused(small_policy):
    policy = copy.deepcopy(small_policy)
    policy.tokens.special.append(5000)
    with pytest.raises(KvcError, match="tokens.special: id 5000 is outside the vocabulary"):
        compile_policy(policy)


def test_a_policy_that_fails_validation_is_refused(tmp_path, small_policy):
    data = small_policy.to_dict()
    data["layers"][2]["heads"][1]["kind"] = "loacl"
    path = tmp_path / "broken.json"
    path.write_text(__import__("json").dumps(data))
    with pytest.raises(KvcError, match=r"layers\[2\]\.heads\[1\]\.kind: unknown kind 'loacl'"):
        compile_policy(path)


def test_class_slots_cover_the_profiled_share_of_special_and_punctuation_tokens(small_policy):
    deployment = deployment_for(small_policy, 4000, 1, "bfloat16")
    head = small_policy.layers[0].heads[0]
    kinds = {option.kind: option for option in head_options(head, deployment, small_policy.profile)}
    both = kinds["special+punct+frequency"]
    assert both.sinks == 4
    assert both.sinks + both.class_slots == -(-(head.special_fraction + head.punct_fraction) * 4000 // 1)
    assert kinds["special+local"].class_slots == max(0, -(-head.special_fraction * 4000 // 1) - 4)
    assert kinds["local"].sinks == kinds["local"].class_slots == 0
    assert kinds["full"].full_slots == 4000 and kinds["full"].recovery == 1.0


def test_absolute_windows_are_read_at_max_len(small_policy):
    head = small_policy.layers[0].heads[0]
    prompts = small_policy.profile.token_counts[0]
    same = window_curve(head, "local", small_policy.profile, prompts)
    longer = window_curve(head, "local", small_policy.profile, 32 * prompts)
    assert max(same.points) < prompts and same.recovery == head.window_curves["local"].recovery[:len(same.points)]
    assert all(a >= b for a, b in zip(same.recovery, longer.recovery))
    assert longer.recovery[-1] < same.recovery[-1]


def test_fastgen_needs_the_fastgen_tables(small_policy):
    policy = copy.deepcopy(small_policy)
    policy.layers[3].heads[1].fastgen = {}
    with pytest.raises(KvcError, match=r"layers\[3\]\.heads\[1\]\.fastgen: empty"):
        compile_policy(policy, strategy="fastgen")


def test_more_memory_than_needed_gives_every_head_everything(small_policy):
    plans = {strategy: compile_policy(small_policy, memory="1GiB", max_len=4096, strategy=strategy)
             for strategy in ("knapsack", "fastgen", "pyramid", "uniform")}
    assert all(float(plan.expected_recovery.min()) == 1.0 for plan in plans.values())
    assert (plans["pyramid"].capacity == 4096).all() and (plans["uniform"].capacity == 4096).all()
    assert plans["knapsack"].notes["knapsack"]["saturated"]
    assert plans["knapsack"].cache_bytes <= plans["fastgen"].cache_bytes  # the cheapest way to recover everything
