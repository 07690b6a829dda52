"""Results computed once per test run and shared by the run's processes through a file."""

import fcntl
import os
from pathlib import Path


def computed_once(tmp_path_factory, name, compute, save, load):
    """`compute()` once per test run, shared through a file where the run has a folder for it: the
    `KVC_TEST_SHARED` folder that `make test` gives both of its pytest runs, or else the folder of
    one run's pytest-xdist workers. The first process to ask computes and saves (holding a lock);
    the others load the file. Alone, a process just computes."""
    shared = os.environ.get("KVC_TEST_SHARED")
    if shared is None and "PYTEST_XDIST_WORKER" in os.environ:
        shared = tmp_path_factory.getbasetemp().parent  # pytest-of-USER/pytest-N, this run's own
    if shared is None:
        return compute()
    path = Path(shared) / name
    with open(path.with_name(f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            return load(path)
        value = compute()
        save(value, path)
        return value
