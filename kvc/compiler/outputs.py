"""Where `kvc compile` writes: the plan, and its report as JSON when asked.

Both destinations are checked before compiling, so a request that fails writes nothing; both
files are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.policies.schema import atomic_write_text


def plan_path(policy: Path, out: Path | None) -> Path:
    """`--out`, or the policy's name with the suffix .plan; never the policy itself."""
    out = Path(out) if out is not None else Path(policy).with_suffix(".plan")
    if out.resolve() == Path(policy).resolve():
        raise KvcError(f"--out {out}: that is the policy file; choose another name for the plan")
    return out


def check_destinations(*paths: Path | None) -> None:
    for path in paths:
        if path is not None and not Path(path).parent.is_dir():
            raise KvcError(f"{path}: the folder {Path(path).parent} does not exist")


def write_outputs(plan: Plan, report: dict, out: Path, json_path: Path | None) -> None:
    plan.save(out)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
