"""A converted model folder in the kvc cache vouches for itself: a manifest of its files, checked on load.

At conversion every file's size, modification time and sha256 go into `kvc-manifest.json`. A load
checks sizes and the safetensors headers (a truncated file never passes), re-hashes whole any file
whose time changed, and for large untouched files hashes the header and a sample of blocks (fast);
small files are always hashed whole. A folder that fails is discarded and converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

from kvc.files import atomic_write_text, temporary_path
from kvc.policies.errors import KvcError

MANIFEST = "kvc-manifest.json"
WHOLE_BELOW = 16 << 20  # files smaller than this are hashed whole on every load
SAMPLE_BLOCKS = 32
SAMPLE_SIZE = 64 << 10


def _hash_whole(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _hash_sample(path: Path, size: int) -> str:
    """sha256 of the first block and SAMPLE_BLOCKS blocks spread evenly up to the end."""
    digest = hashlib.sha256()
    step = max(size // SAMPLE_BLOCKS, 1)
    with open(path, "rb") as handle:
        for offset in [0, *range(step - SAMPLE_SIZE, size, step)]:
            handle.seek(max(offset, 0))
            digest.update(handle.read(SAMPLE_SIZE))
    return digest.hexdigest()


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (header size, JSON, data extent), or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        length = struct.unpack("<Q", head)[0]
        if length + 8 > size:
            return "its header runs past the end of the file (truncated)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    if 8 + length + max(ends, default=0) != size:
        return f"its tensors need {8 + length + max(ends, default=0)} bytes, the file has {size} (truncated?)"
    return None


def _entry(path: Path) -> dict:
    status = path.stat()
    entry = {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "sha256": _hash_whole(path)}
    if status.st_size >= WHOLE_BELOW:
        entry["sample_sha256"] = _hash_sample(path, status.st_size)
    return entry


def write_manifest(folder: Path) -> Path:
    """Record every file of a freshly written folder."""
    files = {path.name: _entry(path) for path in sorted(Path(folder).iterdir())
             if path.is_file() and path.name != MANIFEST}
    return atomic_write_text(Path(folder) / MANIFEST, json.dumps({"kvc_manifest": 1, "files": files}, indent=1) + "\n")


def _file_problem(path: Path, expected: dict) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    status = path.stat()
    if status.st_size != expected.get("size"):
        return f"{path.name} has {status.st_size} bytes, {expected.get('size')} were written"
    if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
        return f"{path.name}: {problem}"
    if status.st_size < WHOLE_BELOW or status.st_mtime_ns != expected.get("mtime_ns"):
        actual = _hash_whole(path) == expected.get("sha256")
    else:
        actual = _hash_sample(path, status.st_size) == expected.get("sample_sha256")
    return None if actual else f"{path.name} changed since it was converted"


def problem(folder: Path) -> str | None:
    """Why a converted folder cannot be trusted, or None. A folder converted before manifests
    existed is checked for truncation, then adopted (its manifest written now)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        for path in folder.glob("*.safetensors"):
            if found := safetensors_problem(path):
                return f"{path.name}: {found}"
        _adopt(folder)
        return None
    try:
        files = json.loads(manifest.read_text()).get("files")
    except (ValueError, AttributeError, OSError):
        files = None
    if not isinstance(files, dict) or not files:
        return f"its {MANIFEST} is unreadable"
    for name, expected in files.items():
        if found := _file_problem(folder / name, expected if isinstance(expected, dict) else {}):
            return found
    if any((folder / name).stat().st_mtime_ns != expected.get("mtime_ns") for name, expected in files.items()):
        _adopt(folder)  # copied or touched, yet whole: record the new times so later loads stay fast
    return None


def _adopt(folder: Path) -> None:
    try:
        write_manifest(folder)
    except (KvcError, OSError):  # a read-only cache is still usable; the next load checks again
        pass


def discard(folder: Path) -> None:
    """Move a folder aside under a temporary name (readers of the old path fail cleanly), then remove it."""
    aside = temporary_path(folder)
    try:
        os.replace(folder, aside)
    except OSError:
        return  # another process got there first
    shutil.rmtree(aside, ignore_errors=True)
