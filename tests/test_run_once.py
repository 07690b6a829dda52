"""`computed_once`: processes of one test run that share a folder compute a result once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent

ASK = """
import json, sys, time
from pathlib import Path
from run_once import computed_once

log = Path(sys.argv[1])
def compute():
    with open(log, "a") as handle:
        handle.write("computed\\n")
    time.sleep(0.5)  # long enough for the other processes to be waiting on the lock
    return {"answer": 42}

save = lambda value, path: path.write_text(json.dumps(value))
load = lambda path: json.loads(path.read_text())
print(json.dumps(computed_once(None, "answer.json", compute, save, load)))
"""


def _ask(count, tmp_path, shared):
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE)}
    if shared:
        environment["KVC_TEST_SHARED"] = str(tmp_path)
    processes = [subprocess.Popen([sys.executable, "-c", ASK, str(tmp_path / "log")], env=environment,
                                  stdout=subprocess.PIPE, text=True) for _ in range(count)]
    answers = [json.loads(process.communicate(timeout=60)[0]) for process in processes]
    assert all(process.returncode == 0 for process in processes)
    return answers, (tmp_path / "log").read_text().count("computed")


@pytest.mark.parametrize("shared, computed", [(True, 1), (False, 3)])
def test_processes_sharing_a_folder_compute_once_and_others_each_compute(tmp_path, shared, computed):
    answers, computations = _ask(3, tmp_path, shared)
    assert answers == [{"answer": 42}] * 3
    assert computations == computed
    assert (tmp_path / "answer.json").exists() == shared
