"""Every command's outputs are checked before it works: never one of its inputs (through symlinks and
hard links), never another output, never a folder, a device, a read-only file or a missing folder;
a refusal is one line, exit code 2, and leaves every file as it was."""

import os

import pytest

from kvc.cli import main
from kvc.files import atomic_write_text
from kvc.outputs import recorded_path
from kvc.policies.schema import save_policy


@pytest.fixture
def workdir(tmp_path, policy, monkeypatch):
    """A folder with a policy, its links, a prompt file, a model folder, a sub-folder and a read-only file."""
    monkeypatch.chdir(tmp_path)
    save_policy(policy, tmp_path / "pol.yaml")
    (tmp_path / "link.yaml").symlink_to("pol.yaml")
    os.link(tmp_path / "pol.yaml", tmp_path / "hard.yaml")
    (tmp_path / "p.jsonl").write_text('{"text": "hello there"}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "folder").mkdir()
    (tmp_path / "ro.json").write_text("{}")
    (tmp_path / "ro.json").chmod(0o444)
    return tmp_path


COMPILABLE = ["--strategy", "knapsack", "--max-len", "256"]  # what the hand-made policy lacks for the defaults


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.is_symlink(), p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


CASES = [
    (["compile", "pol.yaml", "--out", "a.plan", "--json", "pol.yaml"], "--json pol.yaml: that is the policy file"),
    (["compile", "pol.yaml", "--out", "link.yaml"], "--out link.yaml: that is the policy file"),
    (["compile", "pol.yaml", "--out", "hard.yaml"], "--out hard.yaml: that is the policy file"),
    (["compile", "pol.yaml", "--out", "a.plan", "--json", "a.plan"], "--json a.plan: --out writes that file too"),
    (["compile", "pol.yaml", "--out", "folder"], "--out folder: is a folder"),
    (["compile", "pol.yaml", "--out", "a.plan", "--json", "/dev/null"], "--json /dev/null: is not a regular file"),
    (["compile", "pol.yaml", "--out", "a.plan", "--json", "ro.json"], "--json ro.json: the file is read-only"),
    (["compile", "pol.yaml", "--out", "missing/a.plan"], "the folder missing does not exist"),
    (["compile", "pol.yaml", "--out", "/proc/a.plan"], "--out /proc/a.plan: cannot write in /proc"),
    (["show", "pol.yaml", "--png", "pol.yaml"], "--png pol.yaml: that is the file this command reads"),
    (["show", "link.yaml", "--png", "hard.yaml"], "--png hard.yaml: that is the file this command reads"),
    (["profile", "--prompts", "p.jsonl", "--out", "p.jsonl"], "--out p.jsonl: that is the prompt file"),
    (["profile", "model", "--out", "model/config.json"], "a file in the model folder this command reads"),
    (["eval", "--policy", "pol.yaml", "--json", "pol.yaml"], "--json pol.yaml: that is the policy file"),
    (["eval", "--json", "r.json", "--png", "r.json"], "--png r.json: --json writes that file too"),
    (["eval", "--json", "/nonexistent/r.json"], "the folder /nonexistent does not exist"),
    (["eval", "--png", "folder"], "--png folder: is a folder"),
]


@pytest.mark.parametrize("args, message", CASES)
def test_a_bad_output_is_refused_before_any_work(workdir, capsys, args, message):
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and message in " ".join(err.split()), err
    assert len(err.splitlines()) <= 2 and "Traceback" not in err
    assert snapshot(workdir) == before


def test_the_plan_beside_a_linked_policy_is_allowed(workdir, capsys):
    with pytest.raises(SystemExit) as done:
        main(["compile", "link.yaml", *COMPILABLE])
    assert done.value.code == 0 and (workdir / "link.plan").is_file() and (workdir / "pol.yaml").is_file()


def test_compile_writes_both_outputs_or_neither(workdir, capsys, monkeypatch):
    """The report's write fails after the plan's: the plan must not appear either."""
    import kvc.compiler.outputs as outputs

    def full_disk(path, text):
        atomic_write_text(path, text[:10])
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "atomic_write_text", full_disk)
    before = snapshot(workdir)
    with pytest.raises(SystemExit) as done:
        main(["compile", "pol.yaml", "--out", "ok.plan", "--json", "r.json", *COMPILABLE])
    assert done.value.code == 2 and "r.json: No space left on device" in capsys.readouterr().err
    assert snapshot(workdir) == before


def test_result_files_record_paths_relative_to_the_repository_or_here(tmp_path, monkeypatch):
    from kvc.outputs import REPOSITORY

    monkeypatch.chdir(tmp_path)
    assert recorded_path(tmp_path / "runs" / "p.yaml") == "runs/p.yaml"
    assert recorded_path(REPOSITORY / "benchmarks" / "x.json") == "benchmarks/x.json"
    assert recorded_path(os.path.expanduser("~/.cache/kvc/p.yaml")) == "~/.cache/kvc/p.yaml"
    assert recorded_path(None) is None
