"""Exports kept in the kvc cache: one per model and plan, made on first use (`kvc eval --backend onnxruntime`).

A folder `exports/<model fingerprint>-<plan digest>` holds the export of that model with that plan;
the digest covers the plan's header and tables, so any change to the plan exports again. The last
generator is kept open, so the samples of one plan share its onnxruntime sessions.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from kvc.export.exporter import export
from kvc.export.onnx import OnnxGenerator
from kvc.models import LoadedModel, cache_folder
from kvc.plan import Plan


def plan_digest(plan: Plan) -> str:
    digest = hashlib.sha256(json.dumps(plan.header(), sort_keys=True).encode())
    for name, tensor in sorted(plan.tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def export_folder(loaded: LoadedModel, plan: Plan) -> Path:
    """The cached export of this model with this plan, exported now if it is not there."""
    folder = cache_folder("exports") / f"{loaded.fingerprint.replace('sha256:', '')}-{plan_digest(plan)}"
    if not (folder / "manifest.json").is_file():
        export(loaded, plan, folder)
    return folder


def exported_generator(loaded: LoadedModel, plan: Plan) -> OnnxGenerator:
    return _generator(export_folder(loaded, plan))


@lru_cache(maxsize=1)
def _generator(folder: Path) -> OnnxGenerator:
    return OnnxGenerator(folder)
