"""`kvc export`: a model and its plan as ONNX graphs, with everything running them needs beside them.

    DIR/prefill.onnx   prompt ids + attention mask -> last logits + the compressed cache state
    DIR/step.onnx      a chunk of new ids + the state -> the chunk's logits + the new state
    DIR/weights.bin    every large initializer of both graphs, stored once (external data)
    DIR/model.plan     the plan; the tokenizer's files; DIR/manifest.json (what the graphs take and give)

The graphs are `graphs.PrefillGraph` and `graphs.StepGraph` through `torch.onnx.export(dynamo=True)`,
with what they compute from constants alone folded and each repeated expression computed once;
the prompt length is dynamic (from one token up to the plan's max length), batch and
chunk are fixed at export. The folder appears whole or not at all (`kvc.files.atomic_folder`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import torch

from kvc import __version__
from kvc.export.folder import check_out_folder
from kvc.export.graphs import INPUTS, CacheGraph, PrefillGraph, StepGraph
from kvc.files import atomic_folder
from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.runtime.applied import sliding_windows

MANIFEST_VERSION = 1
OPSET = 20
WEIGHTS = "weights.bin"
PLAN_FILE = "model.plan"
GRAPHS = ("prefill", "step")
EXTERNAL_THRESHOLD = 1024  # initializers of at least this many bytes go to the shared weights file
ALIGNMENT = 64
SHORTEST_PROMPT = 1  # the prefill graph's least length (older exports' manifests say 32; OnnxGenerator pads to it)


@dataclass
class Exported:
    folder: Path
    manifest: dict
    seconds: float


def check_exportable(loaded: LoadedModel, plan: Plan, batch: int, chunk: int) -> None:
    """Refuse, in one line, a plan of another model and what the graphs cannot hold."""
    plan.check_model(loaded.fingerprint)
    plan.check_geometry(loaded.model.config)
    windows = sliding_windows(loaded.model.config)
    if batch < 1 or batch > plan.target.batch:
        raise KvcError(f"--batch {batch}: the plan serves 1 to {plan.target.batch} sequences")
    if chunk < 1 or chunk >= plan.target.max_len:
        raise KvcError(f"--chunk {chunk}: a step takes 1 to {plan.target.max_len - 1} tokens")
    if any(window is not None for window in windows) and chunk > 1:
        raise KvcError("--chunk: a model with sliding-window layers is exported with one token per step")
    if loaded.model.device.type != "cpu":
        raise KvcError("export runs on the CPU: load the model with --device cpu")


def export(loaded: LoadedModel, plan: Plan, out, chunk: int = 1, batch: int = 1,
           progress: Callable[[str], None] = lambda step: None) -> Exported:
    """Export `loaded` with `plan` into the folder `out` (replaced whole when it exists)."""
    check_exportable(loaded, plan, batch, chunk)
    check_out_folder(out)
    began = time.perf_counter()
    with atomic_folder(out) as staging:
        graphs = {}
        progress("tracing the step graph")
        graphs["step"], state = _export_graph(StepGraph(loaded, plan, batch), _step_inputs(loaded, chunk, batch))
        progress("tracing the prefill graph")
        graphs["prefill"], _ = _export_graph(PrefillGraph(loaded, plan, batch), _prefill_inputs(loaded, plan, batch))
        progress("writing the graphs and weights")
        sizes = _save_sharing_weights(graphs, staging)
        plan.save(staging / PLAN_FILE)
        loaded.tokenizer.save_pretrained(staging)
        manifest = _manifest(loaded, plan, batch, chunk, state, sizes)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return Exported(Path(out), manifest, time.perf_counter() - began)


def _prefill_inputs(loaded, plan, batch):
    length = min(plan.target.max_len, SHORTEST_PROMPT + 5)  # not a bound, so the exporter keeps it symbolic
    input_ids = torch.randint(0, loaded.model.config.vocab_size, (batch, length))
    dims = torch.export.Dim("prompt_length", min=SHORTEST_PROMPT, max=plan.target.max_len)
    return (input_ids, torch.ones_like(input_ids)), ({1: dims}, {1: dims})


def _step_inputs(loaded, chunk, batch):
    return (torch.randint(0, loaded.model.config.vocab_size, (batch, chunk)),), None


def _export_graph(graph: CacheGraph, example):
    """One graph as an onnx_ir model, and its state's names, shapes and dtypes."""
    from onnxscript.function_libs.torch_lib.ops.core import aten_sort

    inputs, dynamic = example
    state = graph.state_tensors()
    stepping = isinstance(graph, StepGraph)
    if stepping:
        inputs = (*inputs, *graph.state())
        dynamic = None
    name = "step" if stepping else "prefill"
    input_names = [*INPUTS[name], *([f"past.{tensor.name}" for tensor in state] if stepping else [])]
    output_names = ["logits", *[f"present.{tensor.name}" for tensor in state]]
    try:
        with _quiet(), _without_stack_traces(), torch.no_grad():
            program = torch.onnx.export(
                graph, inputs, dynamo=True, opset_version=OPSET, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic, optimize=False, verbose=False,
                # ONNX's TopK breaks ties by the lower index: the stable sort SnapKV's ranking needs.
                custom_translation_table={torch.ops.aten.sort.stable: aten_sort})
    except (torch.onnx.errors.OnnxExporterError, RuntimeError, NotImplementedError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KvcError(f"{type(graph.model).__name__}: the {name} graph does not export ({first})") from None
    finally:
        graph.close()
    _simplify(program.model)
    return program.model, state


def _simplify(model) -> None:
    """Fold what the graph computes from constants alone (the plan's tables, shapes) and compute each
    repeated expression once, in place. onnxruntime folds constants too when it opens a graph, but
    not through `CastLike`, of which the translation writes many."""
    import onnx_ir as ir
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    fold_constants(model)
    ir.passes.Sequential(RemoveUnusedNodesPass(), CommonSubexpressionEliminationPass(), RemoveUnusedNodesPass())(model)


@contextmanager
def _without_stack_traces() -> Iterator[None]:
    """The tracer records no Python stack per node: the saved graphs drop them anyway (see
    `_save_sharing_weights`), so collecting them is work for nothing."""
    import torch.fx.config

    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines, warnings and log records stay out of the command's output."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), redirect_stdout(StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _save_sharing_weights(graphs: dict, folder: Path) -> dict[str, int]:
    """Write each graph with its large initializers in one weights file; a tensor both graphs hold
    (the same bytes) is written once and both point at it. Returns the files' sizes."""
    import onnx_ir as ir

    placed: dict[bytes, tuple[int, int]] = {}
    with open(folder / WEIGHTS, "wb") as weights:
        for name in GRAPHS:
            for value in graphs[name].graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < EXTERNAL_THRESHOLD:
                    continue
                data = tensor.tobytes()
                key = hashlib.sha256(data).digest()
                if key not in placed:
                    weights.write(b"\0" * (-weights.tell() % ALIGNMENT))
                    placed[key] = (weights.tell(), len(data))
                    weights.write(data)
                offset, length = placed[key]
                value.const_value = ir.ExternalTensor(WEIGHTS, offset, length, tensor.dtype, shape=tensor.shape,
                                                      name=value.name, base_dir=folder)
            for node in graphs[name].graph.all_nodes():  # the tracer's stack traces: most of a graph's bytes
                node.metadata_props.clear()
                node.doc_string = None
            ir.save(graphs[name], folder / f"{name}.onnx")
    return {file.name: file.stat().st_size for file in [folder / WEIGHTS, *(folder / f"{g}.onnx" for g in GRAPHS)]}


def _manifest(loaded, plan, batch, chunk, state, sizes) -> dict:
    state_bytes = sum(_nbytes(tensor.shape, tensor.dtype) for tensor in state)
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "kvc_export": MANIFEST_VERSION,
        "kvc_version": __version__,
        "torch_version": torch.__version__,
        "opset": OPSET,
        "model": {"name": loaded.source.name if loaded.source else type(loaded.model).__name__,
                  "fingerprint": loaded.fingerprint, "vocab_size": loaded.model.config.vocab_size},
        "plan": {"file": PLAN_FILE, "fingerprint": plan.fingerprint, "max_len": plan.target.max_len,
                 "dtype": plan.target.dtype, "kv_bits": plan.kv_bits, "cache_bytes": plan.cache_bytes_at(batch),
                 "table_bytes": plan.table_bytes},
        "batch": batch,
        "chunk": chunk,
        "shortest_prompt": SHORTEST_PROMPT,
        "pad_token_id": pad_id,
        "eos_token_id": tokenizer.eos_token_id,
        "graphs": {"prefill": {"inputs": {"input_ids": ["batch", "prompt_length"],
                                          "attention_mask": ["batch", "prompt_length"]},
                               "logits": [batch, loaded.model.config.vocab_size]},
                   "step": {"inputs": {"input_ids": [batch, chunk]},
                            "logits": [batch, chunk, loaded.model.config.vocab_size]}},
        "state": [{"name": tensor.name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
                  for tensor in state],
        "state_bytes": state_bytes,
        "files": sizes,
    }


def _nbytes(shape, dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
