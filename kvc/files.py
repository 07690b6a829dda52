"""Writing files so that a reader never sees half of one and an interruption leaves nothing behind.

Every write goes to a temporary file in the destination's folder, `.NAME.PID-RANDOM.kvc-tmp`, and is
then renamed over the destination. A process killed outright (SIGKILL, power loss) can leave its
temporary behind; the next write into that folder removes those whose process is gone. Inside
`all_or_none()` the renames wait until every write of the block has succeeded, so a command's
outputs appear together or not at all. OS errors become one `KvcError` naming the file.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from kvc.policies.errors import KvcError

TEMPORARY_SUFFIX = ".kvc-tmp"
_OURS = re.compile(r"^\..+\.(\d+)-[0-9a-f]+" + re.escape(TEMPORARY_SUFFIX) + "$")
_LEGACY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp names of kvc before 0.2
LEGACY_AGE_SECONDS = 600  # a write of the old naming older than this is not in progress
_pending: ContextVar[list | None] = ContextVar("kvc_pending_renames", default=None)


def temporary_path(path: Path) -> Path:
    """A fresh name for a temporary beside `path` that says which process made it."""
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_stale(entry: Path, now: float | None = None) -> bool:
    """Whether `entry` is a temporary of kvc's own naming whose writer is gone."""
    ours = _OURS.match(entry.name)
    if ours:
        return not process_alive(int(ours.group(1)))
    if _LEGACY.match(entry.name):
        try:
            return (now or time.time()) - entry.lstat().st_mtime > LEGACY_AGE_SECONDS
        except OSError:
            return False
    return False


def remove_stale(folder: Path) -> list[Path]:
    """Remove kvc's temporary files and folders in `folder` left by processes that are gone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not is_stale(entry, now):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # another process removed it first, or it is not ours to remove
    return removed


def os_reason(error: OSError) -> str:
    return error.strerror or str(error)


def _staging(path: Path) -> Path:
    """A fresh temporary name beside `path`, once its folder is known to exist and stale temporaries are gone."""
    if not path.parent.is_dir():
        raise KvcError(f"{path}: the folder {path.parent} does not exist")
    remove_stale(path.parent)
    return temporary_path(path)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then rename:
    a reader never sees half a file, and an interruption leaves nothing behind."""
    path = Path(path)
    temporary = _staging(path)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
        pending = _pending.get()
        if pending is None:
            os.replace(temporary, path)
        else:
            pending.append((temporary, path))
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise KvcError(f"{path}: cannot write ({os_reason(error)})") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def all_or_none() -> Iterator[None]:
    """Atomic writes inside the block are renamed into place only when the whole block succeeds;
    if it fails (or is interrupted) none of them replaces anything."""
    pending: list[tuple[Path, Path]] = []
    token = _pending.set(pending)
    try:
        yield
    except BaseException:
        _discard(pending)
        raise
    finally:
        _pending.reset(token)
    with _signals_held():
        try:
            for temporary, path in pending:
                os.replace(temporary, path)
        except OSError as error:
            _discard(pending)
            raise KvcError(f"{path}: cannot write ({os_reason(error)})") from None


def _discard(pending: list[tuple[Path, Path]]) -> None:
    for temporary, _ in pending:
        temporary.unlink(missing_ok=True)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the few renames that publish a block's outputs."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def atomic_folder(path) -> Iterator[Path]:
    """Fill a staging folder beside `path` inside the block; when the block succeeds it replaces
    `path` (an old folder of that name is removed after the swap). A failed or interrupted block
    leaves no staging folder behind and the old folder, if any, as it was."""
    path = Path(path)
    staging = _staging(path)
    try:
        staging.mkdir()
    except OSError as error:
        raise KvcError(f"{path}: cannot write in {path.parent} ({os_reason(error)})") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = temporary_path(path)
    with _signals_held():
        try:
            if path.exists():
                os.replace(path, old)
            os.replace(staging, path)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise KvcError(f"{path}: cannot write ({os_reason(error)})") from None
    shutil.rmtree(old, ignore_errors=True)
