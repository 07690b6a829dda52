"""Where `kvc compile` writes: the plan, and its report as JSON when asked.

The CLI checks both destinations before compiling (`kvc.outputs.check_files`); both are then
written together or not at all, so a request that fails writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from kvc.files import all_or_none, atomic_write_text

if TYPE_CHECKING:  # torch: `kvc compile` finds its destination before it loads
    from kvc.plan import Plan


def plan_path(policy: Path, out: Path | None) -> Path:
    """`--out`, or the policy's name with the suffix .plan."""
    return Path(out) if out is not None else Path(policy).with_suffix(".plan")


def write_outputs(plan: Plan, report: dict, out: Path, json_path: Path | None) -> None:
    with all_or_none():
        plan.save(out)
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
