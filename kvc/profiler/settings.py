"""The profiler's settings, checked without torch: `kvc profile` refuses a wrong one at once."""

from __future__ import annotations

from kvc.policies.errors import KvcError


def check_threshold(threshold: float) -> float:
    """FastGen's recovery threshold T: the share of a head's attention its kind must recover, in (0, 1]."""
    if not 0.0 < threshold <= 1.0:
        raise KvcError(f"--threshold {threshold}: must be in (0, 1] (FastGen's paper uses 0.91 to 0.98)")
    return float(threshold)
