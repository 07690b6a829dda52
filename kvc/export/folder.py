"""Where `kvc export` writes: a new folder, or an earlier export that it replaces whole.

Plain Python, so the CLI refuses a wrong destination before torch and the model load.
"""

from __future__ import annotations

from pathlib import Path

from kvc.policies.errors import KvcError


def check_out_folder(out) -> None:
    """Refuse, before any work, a destination that is not a new folder or an earlier export (which is
    replaced whole): an unrelated folder is never deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KvcError(f"--out {out}: is a file; give a folder name (it is created)")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise KvcError(f"--out {out}: the folder exists and is not an earlier export; give a new folder name")
    if not out.parent.is_dir():
        raise KvcError(f"--out {out}: the folder {out.parent} does not exist")
