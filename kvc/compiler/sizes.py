"""Memory sizes and cache dtypes as users write them: '512MiB', '1.5GB', '1000000'; 'bf16'.

Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) powers of
1024, a bare number is bytes. Anything else is a `KvcError` that says what is accepted.
"""

from __future__ import annotations

import math
import re

from kvc.policies.errors import KvcError

UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
DTYPES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}
_SIZE = re.compile(r"\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text, what: str = "--memory") -> int:
    """Bytes in a size such as '2GiB', '1.5 GB' or '1000000'; an int passes through."""
    if isinstance(text, bool):
        raise KvcError(f"{what}: expected a size such as 2GiB, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), "b"
    else:
        match = _SIZE.fullmatch(str(text))
        if match is None or match.group(2).lower() not in UNITS | {"": 1}:
            raise KvcError(
                f"{what}: {str(text)!r} is not a size (a number with an optional unit "
                f"B, KB, MB, GB, TB, KiB, MiB, GiB or TiB, e.g. 2GiB)"
            )
        value, unit = float(match.group(1)), match.group(2).lower() or "b"
    size = value * UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise KvcError(f"{what}: a memory size must be positive (at least one byte), got {text!r}")
    return int(size)


def parse_dtype(name: str, option: str = "--dtype") -> str:
    """The plan's dtype name for a user's spelling ('bf16' -> 'bfloat16')."""
    key = str(name).lower()
    if key not in DTYPES:
        raise KvcError(f"{option}: unknown cache dtype {name!r} (expected bf16, fp16 or fp32)")
    return DTYPES[key]


def format_size(count: float) -> str:
    """A byte count for people: '1.50 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} TiB"
