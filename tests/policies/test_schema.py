"""The policy artifact: exact round trips, atomic writes, and one path-qualified error per mistake."""

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc.policies.errors import KvcError
from kvc.policies.schema import Policy, load_policy, save_policy


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_is_exact(policy, tmp_path, suffix):
    path = save_policy(policy, tmp_path / f"policy{suffix}")
    assert load_policy(path) == policy
    assert Policy.from_dict(policy.to_dict()) == policy


def test_public_contract_keys(policy, tmp_path):
    data = yaml.safe_load(save_policy(policy, tmp_path / "p.yaml").read_text())
    assert list(data)[:3] == ["kvc_policy", "kvc_version", "created"]
    assert {"kvc_policy", "model", "profile", "tokens", "layers"} <= set(data)
    assert {"name", "fingerprint", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim"} <= set(data["model"])
    assert set(data["tokens"]) == {"special", "punctuation"}
    head = data["layers"][0]["heads"][0]
    assert {"index", "funnel", "heads"} <= set(data["layers"][0])
    assert {"kind", "components", "recovery"} <= set(head)


@settings(max_examples=25, deadline=None)
@given(
    recovery=st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    funnel=st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    special=st.lists(st.integers(min_value=0, max_value=10**6), max_size=20),
    kind=st.sampled_from(["special", "special+punct", "local", "frequency+local", "full", "punct+frequency"]),
)
def test_round_trip_property(tmp_path_factory, policy_factory, recovery, funnel, special, kind):
    policy = policy_factory(num_layers=2, num_kv_heads=1, group=1, kinds=(kind,))
    policy.layers[1].heads[0].recovery = recovery
    policy.layers[0].funnel = funnel
    policy.tokens.special = special
    folder = tmp_path_factory.mktemp("rt")
    for name in ("p.yaml", "p.json"):
        assert load_policy(save_policy(policy, folder / name)) == policy


def _write(tmp_path, data, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return path


def _broken(policy, edit):
    data = policy.to_dict()
    edit(data)
    return data


CASES = {
    "unknown kind": (lambda d: d["layers"][1]["heads"][0].update(kind="loacl"),
                     "layers[1].heads[0].kind: unknown kind 'loacl'"),
    "missing key": (lambda d: d["model"].pop("fingerprint"), "model.fingerprint: missing required key"),
    "wrong head count": (lambda d: d["layers"][2]["heads"].pop(), "layers[2].heads: expected 2 KV heads"),
    "wrong layer count": (lambda d: d["layers"].pop(), "layers: expected 3 layers"),
    "bad version": (lambda d: d.update(kvc_policy=7), "kvc_policy: unsupported schema version 7"),
    "non-numeric recovery": (lambda d: d["layers"][0]["heads"][1].update(recovery="high"),
                             "layers[0].heads[1].recovery: expected a number, got 'high'"),
    "recovery out of range": (lambda d: d["layers"][0]["heads"][1].update(recovery=1.5),
                              "layers[0].heads[1].recovery: 1.5 is outside [0.0, 1.0]"),
    "components disagree": (lambda d: d["layers"][0]["heads"][0].update(components=["local"]),
                            "layers[0].heads[0].components"),
    "bad token id": (lambda d: d["tokens"]["special"].append(-3), "tokens.special[3]: expected a token id"),
    "curve lengths": (lambda d: d["layers"][0]["heads"][0]["curves"]["local"]["recovery"].pop(),
                      "layers[0].heads[0].curves.local: 8 points but 7 recovery values"),
    "query head count": (lambda d: d["layers"][0]["heads"][0]["query_heads"].pop(),
                         "layers[0].heads[0].query_heads: expected 2 query heads"),
    "head index": (lambda d: d["layers"][0]["heads"][1].update(index=5), "layers[0].heads[1].index: expected 1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors_name_the_path(policy, tmp_path, case):
    edit, message = CASES[case]
    path = _write(tmp_path, _broken(policy, edit))
    with pytest.raises(KvcError) as error:
        load_policy(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"   \n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
        (b"kvc_policy: 1\nmodel: {name: x\n", "not valid YAML"),
        (b"- just\n- a list\n", "expected a mapping at the top level"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "policy.yaml"
    path.write_bytes(content)
    with pytest.raises(KvcError, match=message):
        load_policy(path)


def test_truncated_file(policy, tmp_path):
    text = save_policy(policy, tmp_path / "p.json").read_text()
    truncated = tmp_path / "cut.json"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(KvcError, match="not valid JSON .*truncated"):
        load_policy(truncated)


def test_json_content_in_a_yaml_file_is_accepted(policy, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(policy.to_dict()))
    assert load_policy(path) == policy


def test_yaml_content_in_a_json_file_is_refused(policy, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(yaml.safe_dump(policy.to_dict()))
    with pytest.raises(KvcError, match="not valid JSON"):
        load_policy(path)


def test_save_into_missing_folder_writes_nothing(policy, tmp_path):
    with pytest.raises(KvcError, match="does not exist"):
        save_policy(policy, tmp_path / "missing" / "p.yaml")
    assert not (tmp_path / "missing").exists()


def test_invalid_policy_is_never_written(policy, tmp_path):
    policy.layers[0].heads[0].kind = "nonsense"
    target = tmp_path / "p.yaml"
    with pytest.raises(KvcError):
        save_policy(policy, target)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_old_file_intact(policy, tmp_path, monkeypatch):
    target = save_policy(policy, tmp_path / "p.yaml")
    before = target.read_bytes()
    import kvc.files as files

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", explode)
    policy.layers[0].funnel = 0.123
    with pytest.raises(KeyboardInterrupt):
        save_policy(policy, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]
