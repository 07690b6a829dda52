"""SIGTERM, Ctrl-C and SIGKILL while `kvc compile --out X` or `kvc profile --out X` writes X: the old X
stays whole; the first two end with "error: interrupted" and exit code 2 and leave no temporary file,
and what SIGKILL leaves is removed by the next write into that folder."""

import signal
import subprocess
import sys
import threading

import pytest

from kvc.cli import main
from kvc.plan import Plan
from kvc.policies.schema import save_policy

# Runs the CLI as the user does, stopping for good when the command opens the temporary file of its
# output (mode 0o666; the writability probe before the work opens its own privately), so that the
# signal lands while the output is being written.
PAUSED_CLI = """
import os, sys, time
real_open = os.open
def open_then_wait(path, flags, mode=0o777, **kwargs):
    descriptor = real_open(path, flags, mode, **kwargs)
    if str(path).endswith(".kvc-tmp") and mode == 0o666:
        print("WRITING", flush=True)
        time.sleep(300)
    return descriptor
os.open = open_then_wait
from kvc.cli import main
main(sys.argv[1:])
"""
COMPILABLE = ["--strategy", "knapsack", "--max-len", "256"]  # what the hand-made policy lacks for the defaults


def run_until_writing(args, cwd) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, *map(str, args)], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    guard = threading.Timer(120, process.kill)  # a test that never reaches the write fails instead of hanging
    guard.start()
    try:
        for line in process.stdout:
            if line.strip() == "WRITING":
                return process
        raise AssertionError(f"the command ended before writing: {process.wait()} {process.stderr.read()}")
    finally:
        guard.cancel()


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".kvc-tmp"))


@pytest.fixture
def workdir(tmp_path, policy, tiny_model_dir):
    save_policy(policy, tmp_path / "pol.yaml")
    (tmp_path / "story.jsonl").write_text('{"text": "The harbour master kept a ledger of every boat that came in."}\n')
    (tmp_path / "X").write_bytes(b"the previous artifact")
    return tmp_path


COMMANDS = {
    "compile": lambda folder, model: ["compile", "pol.yaml", *COMPILABLE, "--out", "X"],
    "profile": lambda folder, model: ["profile", model, "--prompts", "story.jsonl", "--device", "cpu", "--out", "X"],
}


@pytest.mark.parametrize("command, stop", [
    ("compile", signal.SIGTERM), ("compile", signal.SIGINT), ("compile", signal.SIGKILL),
    ("profile", signal.SIGTERM), ("profile", signal.SIGKILL),
])
def test_a_signal_while_writing_keeps_the_old_output(workdir, tiny_model_dir, capsys, command, stop):
    process = run_until_writing(COMMANDS[command](workdir, tiny_model_dir), workdir)
    process.send_signal(stop)
    code = process.wait(timeout=60)
    err = process.stderr.read().strip()
    assert (workdir / "X").read_bytes() == b"the previous artifact"
    if stop == signal.SIGKILL:
        assert code == -signal.SIGKILL and len(temporaries(workdir)) == 1  # the killed writer's, until the next write
        with pytest.raises(SystemExit) as done:
            main(["compile", str(workdir / "pol.yaml"), *COMPILABLE, "--out", str(workdir / "X")])
        assert done.value.code == 0 and Plan.load(workdir / "X").num_layers == 3
    else:
        assert code == 2 and err == "error: interrupted", err
    assert temporaries(workdir) == []
