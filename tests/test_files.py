"""Atomic writes: temporaries of kvc's naming, stale ones removed by the next write, all-or-none blocks."""

import os
import subprocess
import sys

import pytest

from kvc.files import all_or_none, atomic_write_text, remove_stale, temporary_path
from kvc.policies.errors import KvcError


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_leaves_only_its_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "two"


def test_the_next_write_removes_temporaries_of_dead_writers_only(tmp_path):
    dead = tmp_path / f".x.plan.{dead_pid()}-0a1b2c3d.kvc-tmp"
    dead.write_bytes(b"half a plan")
    staging = tmp_path / f".model.{dead_pid()}-deadbeef.kvc-tmp"
    (staging / "inner").mkdir(parents=True)
    alive = tmp_path / f".y.plan.{os.getppid()}-0a1b2c3d.kvc-tmp"  # pytest's parent: alive
    alive.write_bytes(b"being written")
    foreign = tmp_path / ".notes.txt.swp"
    foreign.write_bytes(b"someone else's")
    atomic_write_text(tmp_path / "other.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, foreign.name, "other.txt"])


def test_old_style_temporaries_go_once_old(tmp_path):
    old, fresh = tmp_path / ".p.yaml.abcd1234.tmp", tmp_path / ".q.yaml.efgh5678.tmp"
    old.write_text("x")
    fresh.write_text("y")
    os.utime(old, (0, 0))
    assert remove_stale(tmp_path) == [old] and fresh.exists()


def test_temporary_names_carry_the_writer(tmp_path):
    name = temporary_path(tmp_path / "a.plan").name
    assert name.startswith(f".a.plan.{os.getpid()}-") and name.endswith(".kvc-tmp")


def test_all_or_none_publishes_together_or_not_at_all(tmp_path):
    (tmp_path / "a").write_text("old a")
    with pytest.raises(KvcError, match="disk is full"):
        with all_or_none():
            atomic_write_text(tmp_path / "a", "new a")
            assert (tmp_path / "a").read_text() == "old a"  # nothing replaced yet
            raise KvcError("the disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and (tmp_path / "a").read_text() == "old a"
    with all_or_none():
        atomic_write_text(tmp_path / "a", "new a")
        atomic_write_text(tmp_path / "b", "new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"] and (tmp_path / "a").read_text() == "new a"


def test_an_os_error_while_writing_is_one_line(tmp_path):
    """A file-size limit makes the write fail as a full disk would: one KvcError, no temporary left."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "from kvc.files import atomic_write_bytes\n"
        "from kvc.policies.errors import KvcError\n"
        "try:\n"
        f"    atomic_write_bytes({str(tmp_path / 'big.bin')!r}, bytes(5000))\n"
        "except KvcError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"{tmp_path / 'big.bin'}: cannot write (File too large)", done.stderr
    assert list(tmp_path.iterdir()) == []
