"""`kvc profile`: a run that writes a valid policy, and every bad input answered with one line,
exit code 2 and nothing written."""

import json

import pytest
from profiler_tiny_models import STORY

from kvc.cli import main
from kvc.policies.schema import load_policy
from kvc.profiler import profile as profiler


@pytest.fixture
def embedded(monkeypatch, smollm):
    """The CLI loads the session's embedded model instead of loading it again."""
    monkeypatch.setattr(profiler, "load_model", lambda name, device, dtype: smollm)
    return smollm


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        json.dumps({"name": "ledger", "text": STORY}),
        json.dumps({"name": "haiku", "messages": [{"role": "user", "content": "A haiku about autumn leaves, please."}]}),
    ]))
    return path


def run(capsys, *args):
    with pytest.raises(SystemExit) as done:
        main(["profile", *map(str, args)])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_profile_writes_a_policy_and_a_summary(capsys, embedded, prompt_file, tmp_path):
    out = tmp_path / "policy.yaml"
    code, stdout, _ = run(capsys, "--prompts", prompt_file, "--max-tokens", 64, "--out", out)
    assert code == 0
    assert "warning:" in stdout and "'ledger'" in stdout  # cut to 64 tokens
    assert "KV heads per FastGen choice" in stdout and "mean recovery" in stdout and "saved" in stdout
    policy = load_policy(out)
    assert policy.profile.prompt_count == 2 and policy.profile.token_counts[0] == 64
    assert policy.model.name == "smollm2-135m" and len(policy.layers) == 30


@pytest.mark.parametrize("threshold", ["0", "1.5", "-0.2"])
def test_a_threshold_outside_0_1_is_refused(capsys, tmp_path, threshold):
    code, _, err = run(capsys, "--threshold", threshold, "--out", tmp_path / "p.yaml")
    assert code == 2 and "--threshold" in err and "(0, 1]" in err
    assert not (tmp_path / "p.yaml").exists()


def test_an_output_in_a_missing_folder_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "--out", tmp_path / "missing" / "p.yaml")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "is empty"),
    ("broken.jsonl", '{"text": "ok"}\n{"text": ', "line 2: not valid JSON"),
    ("blob.txt", b"\x00\xff\xfe\x00binary", "not a UTF-8 text file"),
])
def test_bad_prompt_files_are_refused(capsys, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run(capsys, "--prompts", path, "--out", tmp_path / "p.yaml")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "p.yaml").exists()


def test_a_missing_prompt_file_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "--prompts", tmp_path / "nope.jsonl", "--out", tmp_path / "p.yaml")
    assert code == 2 and "no such prompt file" in err


def test_strict_refuses_a_prompt_over_the_limit(capsys, embedded, prompt_file, tmp_path):
    code, _, err = run(capsys, "--prompts", prompt_file, "--max-tokens", 64, "--strict", "--out", tmp_path / "p.yaml")
    assert code == 2 and "'ledger'" in err and "--strict" in err
    assert not (tmp_path / "p.yaml").exists()


def test_ctrl_c_leaves_no_file(capsys, embedded, prompt_file, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        kwargs["progress"]("ledger")
        raise KeyboardInterrupt

    monkeypatch.setattr(profiler, "profile_model", interrupted)
    out = tmp_path / "p.yaml"
    code, _, err = run(capsys, "--prompts", prompt_file, "--out", out)
    assert code == 2 and "interrupted; nothing was written" in err
    assert list(tmp_path.iterdir()) == [prompt_file]
