"""Crafted YAML and JSON files are refused at once in one line: alias bombs, deep nesting, foreign tags,
oversized files, folders, numbers too long to read; and a policy passes only with what the compiler needs."""

import json
import os
import re
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc.policies.errors import KvcError
from kvc.policies.limits import MAX_FILE_BYTES, MAX_NESTING
from kvc.policies.schema import load_policy, save_policy
from kvc.policies.structured import parse_yaml

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def refused(path, match) -> str:
    """The error loading `path` gives, which must match, be one line and name the file; in under a second."""
    started = time.perf_counter()
    with pytest.raises(KvcError, match=match) as error:
        load_policy(path)
    assert time.perf_counter() - started < 1.0
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


@pytest.mark.parametrize("where", ["top", "created"])
def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, policy, where):
    text = ALIAS_BOMB  # 9^9 x's from 300 bytes
    if where == "created":  # a policy whose `created` is the bomb, which str() would expand
        dumped = yaml.safe_dump(policy.to_dict())
        assert "created: '2026-11-23T10:00:00+00:00'" in dumped
        text += dumped.replace("created: '2026-11-23T10:00:00+00:00'", "created: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    refused(path, r"line \d+: YAML anchors and aliases .* are not allowed")


def test_a_single_anchor_is_refused_too(tmp_path, policy):
    text = yaml.safe_dump(policy.to_dict()).replace("tokens:", "tokens: &t")
    path = tmp_path / "anchor.yaml"
    path.write_text(text)
    refused(path, "anchors and aliases")


def test_a_python_tag_is_named_not_blamed_on_truncation(tmp_path):
    path = tmp_path / "tagged.yaml"
    path.write_text("kvc_policy: 1\nmodel: !!python/object/apply:os.system ['true']\n")
    message = refused(path, r"line 2: the YAML tag !!python/object/apply:os.system is not allowed")
    assert "truncated" not in message


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_nesting_100k_deep_is_one_line_not_a_recursion_error(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(path, f"nested more than {MAX_NESTING} levels deep")


def test_json_nested_past_the_bound_but_within_pythons_recursion_is_refused(tmp_path):
    path = tmp_path / "deep.json"
    depth = MAX_NESTING + 1
    path.write_text("[" * depth + "]" * depth)
    refused(path, "nested more than")
    path.write_text("[" * (depth - 1) + "]" * (depth - 1))
    refused(path, "expected a mapping at the top level")  # the nesting itself passed


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_number_too_long_to_read(tmp_path, suffix):
    path = tmp_path / f"long{suffix}"
    path.write_text('{"kvc_policy": ' + "9" * 5000 + "}")
    refused(path, "more than 4300 digits")


def test_a_file_larger_than_any_artifact_is_refused_unread(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written or read
    refused(path, "larger than any policy file kvc reads")


def test_a_folder_and_a_pipe_are_named_as_such(tmp_path):
    refused(tmp_path, "is a folder, not a policy file")
    refused(tmp_path / "missing.yaml", "no such policy file")
    pipe = tmp_path / "pipe.yaml"
    os.mkfifo(pipe)
    refused(pipe, "not a regular file")


def test_truncation_is_still_suspected_where_the_text_ends_early(tmp_path, policy):
    text = save_policy(policy, tmp_path / "p.yaml").read_text()
    cut = tmp_path / "cut.yaml"
    cut.write_text(text[: text.index("layers:") + 40].rstrip() + " [1, 2")
    refused(cut, "not valid YAML .*truncated")


def _saved(tmp_path, policy, edit, suffix=".json"):
    data = policy.to_dict()
    edit(data)
    path = tmp_path / f"edited{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return path


def _head(data):
    return data["layers"][0]["heads"][0]


# What the compiler relies on, each refused by validation with the field named.
COMPILER_NEEDS = {
    "vocabulary of 10^12": (lambda d: d["model"].update(vocab_size=10**12), "model.vocab_size: must be at most"),
    "head dim of 10^12": (lambda d: d["model"].update(head_dim=10**12), "model.head_dim: must be at most 1024"),
    "context of 2^40": (lambda d: d["model"].update(max_position_embeddings=2**40),
                        "model.max_position_embeddings: must be at most"),
    "layer count": (lambda d: d["model"].update(num_layers=10**6), "model.num_layers: must be at most"),
    "infinite curve point": (lambda d: _head(d)["curves"]["local"]["points"].__setitem__(-1, float("inf")),
                             "curves.local.points[7]: expected a finite number"),
    "fraction curve past 1": (lambda d: _head(d)["curves"]["local"]["points"].__setitem__(-1, 3.0),
                              "curves.local.points[7]: 3 is outside [0, 1.0]"),
    "empty curve": (lambda d: _head(d)["curves"]["local"].update(points=[], recovery=[]),
                    "curves.local.points: empty; a curve needs at least one point"),
    "huge window point": (lambda d: _head(d)["window_curves"]["local"].update(points=[16, 1e300]),
                          "window_curves.local.points[1]: 1e+300 is outside"),
    "token id past the vocabulary": (lambda d: (d["model"].update(vocab_size=31), d["tokens"]["punctuation"].append(31)),
                                     "tokens.punctuation[2]: id 31 is outside the vocabulary of 31 tokens"),
    "token id past any vocabulary": (lambda d: d["tokens"]["special"].append(2**40),
                                     "tokens.special[3]: id 1099511627776 is outside the vocabulary"),
    "sinks": (lambda d: d["profile"].update(sinks=2**40), "profile.sinks: must be at most"),
    "created as a list": (lambda d: d.update(created=list(range(1000))), "created: expected a string, got a list"),
    "huge integer recovery": (lambda d: _head(d).update(recovery=10**400), "recovery: expected a finite number"),
}


@pytest.mark.parametrize("case", sorted(COMPILER_NEEDS))
def test_policy_validation_covers_what_the_compiler_relies_on(tmp_path, policy, case):
    edit, message = COMPILER_NEEDS[case]
    refused(_saved(tmp_path, policy, edit), re.escape(message))


def test_an_unquoted_date_still_reads_as_the_created_text(tmp_path, policy):
    path = _saved(tmp_path, policy, lambda d: None, ".yaml")
    path.write_text(path.read_text().replace("created: '2026-11-23T10:00:00+00:00'", "created: 2026-11-23"))
    assert load_policy(path).created == "2026-11-23"


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["1_000", "0x1F", "017", "1:30", "yes", "Off", "~", ".inf", "2026-11-23", "1e3", "+12", ""]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(derandomize=True, database=None, max_examples=80, deadline=None)
@given(data=PLAIN, flow=st.booleans())
def test_plain_yaml_reads_as_pyyamls_safe_loader_reads_it(data, flow):
    text = yaml.safe_dump({"data": data}, default_flow_style=flow, allow_unicode=True)
    assert parse_yaml(text) == yaml.safe_load(text)


@pytest.mark.parametrize("text, message", [
    ("a: 1\n---\nb: 2\n", "line 2: a second YAML document"),
    ("base: {x: 1}\nother:\n  <<: {y: 2}\n", "'<<' is a YAML !!merge key"),
    ("? [1, 2]\n: value\n", "a mapping key that is a list or a mapping"),
    ("flag: !!bool maybe\n", "'maybe' is not a YAML !!bool"),
    ("items: !!map [1, 2]\n", "the YAML tag !!map does not fit a list"),
    ("count: !!int twelve\n", "a value cannot be read"),
])
def test_yaml_beyond_plain_data_is_refused_in_one_line(text, message):
    with pytest.raises(KvcError, match=re.escape(message)):
        parse_yaml(text)
