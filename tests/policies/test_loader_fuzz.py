"""Fuzzing the policy and plan loaders: any mutation of a valid file (bytes flipped, the file cut short,
fields deleted, values swapped for other types, huge numbers) gives a loaded object or a KvcError, never
another exception, in well under a second and a bounded amount of memory. A policy that loads also
compiles or is refused in one line, and a plan that loads can be measured.

Hypothesis runs derandomized (the same examples every run, no example database)."""

import copy
import json
import time
import tracemalloc

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from kvc.compiler import compile_policy
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.policies.schema import load_policy
from kvc.policies.synthetic import synthetic_policy

SECONDS = 1.0  # per load (and compile): an artifact below the size bound never takes longer
PEAK_BYTES = 64 * 2**20  # Python memory one load may take at its peak
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ODD_VALUES = [None, True, "x", "", [], {}, -1, 0, 1.5, float("inf"), float("nan"), 10**30, -(10**30), 2**63,
              1e308, [1, 2], {"a": 1}]
HUGE_NUMBERS = [10**12, 2**31, 2**63, 10**400, 1e300, -(10**18)]


def nodes(data) -> list[tuple]:
    """Every (container, key) in a nested structure, breadth first (no recursion)."""
    found, level = [], [data]
    while level:
        following = []
        for container in level:
            keys = container.keys() if isinstance(container, dict) else range(len(container))
            for key in keys:
                found.append((container, key))
                if isinstance(container[key], (dict, list)):
                    following.append(container[key])
        level = following
    return found


@st.composite
def edited(draw, data):
    """`data` with one to three fields deleted, swapped for another type or made huge."""
    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 3))):
        places = nodes(data)
        if not places:
            break
        container, key = places[draw(st.integers(0, len(places) - 1))]
        action = draw(st.sampled_from(["delete", "swap", "huge"]))
        if action == "delete":
            container.pop(key)
        elif action == "swap":
            container[key] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))
        else:
            container[key] = draw(st.sampled_from(HUGE_NUMBERS))
    return data


@st.composite
def damaged(draw, raw: bytes) -> bytes:
    """`raw` as it is, with bytes flipped, or cut short."""
    action = draw(st.sampled_from(["keep", "flip", "cut"]))
    if action == "cut":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    raw = bytearray(raw)
    if action == "flip":
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    return bytes(raw)


def within_bounds(action):
    """Run `action`; a KvcError counts as a clean refusal. It must finish in SECONDS and PEAK_BYTES."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = action()
    except KvcError as error:
        assert "\n" not in str(error), str(error)
        result = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - started < SECONDS
    assert peak < PEAK_BYTES, peak
    return result


@pytest.fixture(scope="module")
def small_policy():
    return synthetic_policy(2, 4, 2, 16, seed=5, max_position_embeddings=512, vocab_size=300)


@pytest.fixture(scope="module")
def small_plan(small_policy):
    return compile_policy(small_policy, 0.3, max_len=512, strategy="knapsack", kv_bits=0)


@FUZZ
@given(data=st.data())
def test_a_mutated_policy_loads_or_is_refused(tmp_path_factory, small_policy, data):
    fields = data.draw(edited(small_policy.to_dict()))
    fmt = data.draw(st.sampled_from(["yaml", "json"]))
    text = json.dumps(fields) if fmt == "json" else yaml.safe_dump(fields, sort_keys=False)
    path = tmp_path_factory.mktemp("fuzz") / f"policy.{fmt}"
    path.write_bytes(data.draw(damaged(text.encode())))
    loaded = within_bounds(lambda: load_policy(path))
    if loaded is not None:
        strategy = data.draw(st.sampled_from(["knapsack", "fastgen", "uniform", "retrieval"]))
        within_bounds(lambda: compile_policy(loaded, 0.3, max_len=512, strategy=strategy))


def _mutated_tensors(data, tensors: dict) -> dict:
    tensors = dict(tensors)
    name = data.draw(st.sampled_from(sorted(tensors)))
    action = data.draw(st.sampled_from(["keep", "delete", "dtype", "shape", "value"]))
    if action == "delete":
        tensors.pop(name)
    elif action == "dtype":
        tensors[name] = tensors[name].to(data.draw(st.sampled_from([torch.int64, torch.float16, torch.int8])))
    elif action == "shape":
        tensors[name] = tensors[name].flatten()[: data.draw(st.integers(0, tensors[name].numel()))].clone()
    elif action == "value":
        tensors[name] = tensors[name].clone()
        flat = tensors[name].view(-1)
        value = data.draw(st.sampled_from([-1, 0, 3, 255, 2**20]))
        flat[data.draw(st.integers(0, flat.numel() - 1))] = value % 256 if flat.dtype == torch.uint8 else value
    return tensors


@FUZZ
@given(data=st.data())
def test_a_mutated_plan_loads_or_is_refused(tmp_path_factory, small_plan, data):
    header = data.draw(edited(small_plan.header()))
    tensors = _mutated_tensors(data, small_plan.tensors())
    try:
        metadata = json.dumps(header)
    except ValueError:  # json.dumps refuses nothing here, but keep the fuzz honest if it did
        metadata = "{}"
    raw = save(tensors, metadata={"kvc_plan": metadata}) if tensors else b""
    path = tmp_path_factory.mktemp("fuzz") / "fuzzed.plan"
    path.write_bytes(data.draw(damaged(raw)) if raw else raw)
    loaded = within_bounds(lambda: Plan.load(path))
    if loaded is not None:
        assert loaded.cache_bytes <= (loaded.target.budget_bytes or loaded.cache_bytes)
        assert int(loaded.offsets[:, -1].max()) < int(loaded.layer_slots.max())
