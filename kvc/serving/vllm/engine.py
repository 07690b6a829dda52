"""Getting a vLLM engine ready for a plan: the folder it serves, the settings it starts with, the checks.

vLLM reads a transformers folder whose config names its architecture; kvc's converted GGUF folders
do not, so the served folder is then a copy in the kvc cache (links to the weights and tokenizer,
a config with `architectures`; made once, then found without transformers' model table). `engine_settings`
fills the engine arguments a plan needs (kvc's backend, no prefix caching, eager mode, the plan's
max length) and refuses, before vLLM is even imported, longer sequences than the plan was compiled
for, another cache dtype or tensor-parallel ranks that do not split its KV heads (`check_settings`,
before the model is read) and a plan of another model, each as one line; `check_engine` (run by
kvc's platform when vLLM builds its config, whoever started it) checks the engine vLLM actually
built the same way (`check_fit`: all of them).
vLLM's processes talk through socket files it leaves in the system's temporary folder; a kvc engine
puts them in a folder of its own, removed when the process ends (`private_rpc_folder`).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from kvc.files import atomic_folder, atomic_write_text, remove_stale, temporary_path
from kvc.models import cache_folder, converted_gguf_dir, fingerprint, resolve
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.serving.vllm.plans import PLAN_ENV
from kvc.serving.vllm.plugins import general_plugin

RPC_ENV = "VLLM_RPC_BASE_PATH"
WARNED_ENV = "KVC_VLLM_RANKS_WARNED"  # the plan whose unbalanced ranks were warned about (`warn_unbalanced`)
SOCKET_PATH_MAX = 103  # bytes in a unix socket's path (macOS; Linux allows 107)
SOCKET_NAME = 36  # vLLM names each socket file by a uuid4
REFUSED = {"enable_prefix_caching": "prefix caching: a kvc page holds a sequence's keep-sets, not a token range "
                                    "another request could share; leave --enable-prefix-caching off",
           "speculative_config": "speculative decoding: a kvc cache admits every token it attends (evicting for "
                                 "it), so it cannot take back the draft tokens the model rejects; leave "
                                 "--speculative-config off"}


def served_folder(model: str | None) -> Path:
    """The transformers folder vLLM loads for a model argument (alias, folder, .gguf or cached hub id)."""
    source = resolve(model)
    if source.kind == "gguf":
        folder = converted_gguf_dir(Path(source.location))
    elif source.kind == "dir":
        folder = Path(source.location)
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source.location, local_files_only=True))
    config = json.loads((folder / "config.json").read_text())
    return folder if config.get("architectures") else _with_architectures(folder, config)


def _with_architectures(folder: Path, config: dict) -> Path:
    """A copy of `folder` in the kvc cache whose config names the causal-LM class of its model type.

    The copy made for an earlier serve is used again when its config is this one plus that name,
    without importing transformers' model table (seconds) to look the name up."""
    target = cache_folder("served") / f"{folder.name}-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]}"
    made = _served_config(target)
    if made.get("architectures") and {**made, "architectures": None} == {**config, "architectures": None}:
        return target
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    if name is None:
        raise KvcError(f"{folder}: its config names no architecture and model type {config.get('model_type')!r} "
                       "has no causal-LM class; add `architectures` to its config.json")
    with atomic_folder(target) as staging:
        for path in folder.iterdir():
            if path.is_file() and path.name != "config.json":
                os.symlink(path.resolve(), staging / path.name)
        atomic_write_text(staging / "config.json", json.dumps({**config, "architectures": [name]}, indent=2) + "\n")
    return target


def _served_config(folder: Path) -> dict:
    """The config of an earlier served copy, {} where there is none (or it cannot be read)."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def plan_file(plan: Plan | str | Path) -> tuple[Plan, Path]:
    """A plan and a file holding it (vLLM's processes read it there): a Plan object is saved in the kvc cache."""
    if isinstance(plan, Plan):
        path = cache_folder("served", "plans") / f"{_plan_digest(plan)}.plan"
        if not path.is_file():
            plan.save(path)
        return plan, path
    path = Path(plan).expanduser().resolve()
    if not path.is_file():
        raise KvcError(f"{plan}: no such plan file")
    return Plan.load(path), path


def _plan_digest(plan: Plan) -> str:
    digest = hashlib.sha256(json.dumps(plan.header(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(plan.tensors().items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def engine_settings(model: str | None, plan: Plan | str | Path, engine_args: dict) -> tuple[Path, dict]:
    """(folder to serve, engine arguments) for a plan; KVC_VLLM_PLAN names the plan from now on."""
    for name, reason in REFUSED.items():
        if engine_args.get(name):
            raise KvcError(f"kvc does not support {reason}")
    plan, path = plan_file(plan)
    settings = {"attention_backend": "CUSTOM", "enable_prefix_caching": False, "enforce_eager": True,
                "max_model_len": plan.target.max_len, "max_num_batched_tokens": plan.target.max_len, **engine_args}
    check_settings(plan, settings["max_model_len"], settings.get("kv_cache_dtype", "auto"),  # before the model: quick
                   settings.get("tensor_parallel_size", 1))
    folder = served_folder(model)
    plan.check_model(_folder_fingerprint(folder))
    os.environ[PLAN_ENV] = str(path)
    private_rpc_folder()
    general_plugin()  # vLLM may have loaded its plugins in this process before the plan was named
    # Every prompt that fits a step's token budget prefills whole, as in kvc's own runtime: with chunked
    # prefill vLLM would split whichever prompt the budget runs out in, and its rest would be admitted
    # token by token through `extend`, with the keep-sets chosen from its first chunk. A budget below
    # the longest sequence needs the chunks: then prompts longer than it go through `extend`.
    settings.setdefault("enable_chunked_prefill", settings["max_num_batched_tokens"] < settings["max_model_len"])
    return folder, settings


def private_rpc_folder() -> Path | None:
    """Point vLLM's inter-process sockets (RPC_ENV) at a folder of this process's own, removed at exit.

    vLLM makes them in the system's temporary folder and leaves them there, a few per engine start;
    the folder is a kvc temporary (`.vllm.PID-RANDOM.kvc-tmp`), so one that a killed process left
    is removed by the next start. None when the variable is set already (by the user, or for an
    earlier engine of this process), or when the sockets' paths in the folder would be too long
    for a socket (a long TMPDIR): vLLM then uses the temporary folder itself, as it would anyway."""
    if os.environ.get(RPC_ENV):
        return None
    base = Path(tempfile.gettempdir())
    remove_stale(base)
    folder = temporary_path(base / "vllm")
    if len(os.fsencode(folder)) + 1 + SOCKET_NAME > SOCKET_PATH_MAX:
        return None
    folder.mkdir(mode=0o700)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ[RPC_ENV] = str(folder)
    return folder


def _folder_fingerprint(folder: Path) -> str:
    from transformers import AutoConfig, AutoTokenizer

    return fingerprint(AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))


def check_fit(plan: Plan, model_fingerprint: str, max_model_len: int, cache_dtype: str = "auto",
              tensor_parallel: int = 1) -> None:
    """Refuse, in one line each, a plan of another model, longer sequences than the plan was compiled
    for, a cache dtype other than the plan's, or tensor-parallel ranks that do not split its KV heads."""
    check_settings(plan, max_model_len, cache_dtype, tensor_parallel)
    plan.check_model(model_fingerprint)


def check_settings(plan: Plan, max_model_len: int, cache_dtype: str, tensor_parallel: int = 1) -> None:
    """The engine settings `check_fit` refuses, checked without the model (it takes seconds to load)."""
    if max_model_len > plan.target.max_len:
        raise KvcError(f"the engine serves sequences of up to {max_model_len} tokens but the plan was compiled "
                       f"for --max-len {plan.target.max_len}; pass --max-model-len {plan.target.max_len} or recompile "
                       f"with `kvc compile POLICY --max-len {max_model_len}`")
    if cache_dtype not in ("auto", plan.target.dtype):
        raise KvcError(f"--kv-cache-dtype {cache_dtype}: the plan stores its cache as {plan.target.dtype}; leave "
                       "--kv-cache-dtype at auto or recompile with `kvc compile POLICY --dtype ...`")
    plan.check_ranks(tensor_parallel)


def check_engine(plan: Plan, vllm_config) -> None:
    """Refuse, in one line each, an engine the plan does not fit."""
    from transformers import AutoTokenizer

    if vllm_config.speculative_config is not None:  # an engine made without `llm()` or `kvc serve`
        raise KvcError(f"kvc does not support {REFUSED['speculative_config']}")
    model = vllm_config.model_config
    tokenizer = AutoTokenizer.from_pretrained(model.tokenizer)
    tensor_parallel = vllm_config.parallel_config.tensor_parallel_size
    check_fit(plan, fingerprint(model.hf_config, tokenizer), model.max_model_len, vllm_config.cache_config.cache_dtype,
              tensor_parallel)
    warn_unbalanced(plan, tensor_parallel)


def warn_unbalanced(plan: Plan, ranks: int, tolerance: float = 1.01) -> float:
    """Warn when the ranks' shares of the plan differ (compiled for another rank count), so that every
    rank holds more than its own share: returns the largest rank's bytes over the mean's. vLLM checks
    its config in the process that starts the engine and again in the engine's own: the first to warn
    notes it in WARNED_ENV, which the engine's processes inherit, so the warning is read once."""
    from kvc.serving.vllm.pages import rank_imbalance

    imbalance = rank_imbalance(plan, ranks) if ranks > 1 else 1.0
    served = f"{plan.fingerprint} {plan.target.budget_bytes} {ranks}"
    if imbalance > tolerance and plan.tensor_parallel_size != ranks and os.environ.get(WARNED_ENV) != served:
        os.environ[WARNED_ENV] = served
        logging.getLogger(__name__).warning(
            "kvc: the plan was compiled for %d tensor-parallel rank(s) and is served over %d: every rank's blocks "
            "hold the largest rank's share, %.2fx the mean rank's; `kvc compile POLICY --tensor-parallel-size %d` "
            "balances them", plan.tensor_parallel_size, ranks, imbalance, ranks)
    return imbalance
