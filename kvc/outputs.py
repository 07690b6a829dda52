"""A command's files, declared before it works: what it reads and what it will write.

`check_files` refuses, in one line naming the option, an output that is one of the command's
inputs (symlinks and hard links followed; an existing file inside an input folder counts as
read), that another output names too, that is a folder or not a plain file, that is read-only,
or whose folder is missing or cannot be written in (tried with a real file); `check_inputs`
refuses a file to read that is missing or not a file. Commands call them before any slow step,
so a refused command has done nothing; `kvc.files.all_or_none` then makes their outputs appear
together or not at all.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kvc.files import os_reason, temporary_path
from kvc.policies.errors import KvcError
from kvc.policies.structured import input_file

_CHECKOUT = Path(__file__).resolve().parents[1]
REPOSITORY = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else None  # kvc's source checkout, if it runs from one


def _identity(path: Path) -> tuple:
    """What makes two names one file: the inode when it exists, else the resolved path."""
    try:
        status = os.stat(path)
        return ("inode", status.st_dev, status.st_ino)
    except OSError:
        return ("path", Path(path).resolve())


def _inside(path: Path, folder: Path) -> bool:
    return path.exists() and path.resolve().is_relative_to(folder.resolve())


def _same_as_input(option: str, path: Path, inputs: dict[str, Path]) -> None:
    for name, source in inputs.items():
        if _identity(path) == _identity(source):
            raise KvcError(f"{option} {path}: that is the {name} this command reads; choose another file name")
        if source.is_dir() and _inside(path, source):
            raise KvcError(f"{option} {path}: a file in the {name} folder this command reads; choose another file name")


def check_writable(option: str, path: Path) -> None:
    """One clear line now rather than an OSError after the work, for a destination that cannot be written."""
    parent = path.parent
    if path.is_dir():
        raise KvcError(f"{option} {path}: is a folder; give the name of a file (in it, or elsewhere)")
    if not parent.exists():
        raise KvcError(f"{option} {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise KvcError(f"{option} {path}: {parent} is not a folder")
    if path.exists():
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise KvcError(f"{option} {path}: is not a regular file; give a file name")
        if not mode & 0o222:
            raise KvcError(f"{option} {path}: the file is read-only; make it writable or choose another name")
    probe = temporary_path(path)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as error:
        raise KvcError(f"{option} {path}: cannot write in {parent} ({os_reason(error)})") from None


def check_files(outputs: dict[str, object], inputs: dict[str, object] | None = None) -> None:
    """Check a command's outputs ({option: path or None}) against its inputs ({what: path or None})
    and each other, and that each can be written. Inputs that are not paths on disk are ignored."""
    readable = {name: Path(path) for name, path in (inputs or {}).items() if path is not None and Path(path).exists()}
    seen: dict[tuple, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        _same_as_input(option, path, readable)
        identity = _identity(path)
        if identity in seen:
            raise KvcError(f"{option} {path}: {seen[identity]} writes that file too; give each output its own name")
        seen[identity] = option
        check_writable(option, path)


def check_inputs(inputs: dict[str, object]) -> None:
    """Check that each input ({what: path or None}) is a file kvc would read, before any library loads:
    a missing plan or policy is named at once, with the words its reader would use."""
    for what, path in inputs.items():
        if path is not None:
            input_file(path, what)


def recorded_path(path) -> str | None:
    """A path as result files record it: relative to the repository kvc runs from (or to the current
    folder), else under ~; never an absolute path of the machine that wrote it when avoidable."""
    if path is None:
        return None
    absolute = Path(path).expanduser().absolute()
    for base in (REPOSITORY, Path.cwd()):
        if base is not None and absolute.is_relative_to(base):
            return absolute.relative_to(base).as_posix() or "."
    if absolute.is_relative_to(Path.home()):
        return "~/" + absolute.relative_to(Path.home()).as_posix()
    return absolute.as_posix()

