"""kvc plans in vLLM, through its plugin interfaces (no fork): `kvc serve`, or `llm()` for batches.

    from kvc.serving.vllm import llm
    engine = llm("smollm2-135m", "model.plan", dtype="float32")     # a vllm.LLM
    outputs = engine.generate(["..."], vllm.SamplingParams(max_tokens=16, temperature=0))

Pieces: `pages` (a layer's per-sequence state as a byte page), `spec` (the page as vLLM's
KV-cache spec, one block per request), `backend` (prefill/extend on a request's block),
`platform` and `worker` (the hooks vLLM's CPU build needs), `plugins` (the entry points),
`engine` (served folder, settings, checks), `server` (`kvc serve`). Needs `pip install kvc[vllm]`.
"""

from __future__ import annotations

from pathlib import Path

from kvc.plan import Plan
from kvc.policies.errors import KvcError


def llm(model: str | None, plan: Plan | str | Path, **engine_args):
    """A `vllm.LLM` serving `model` (alias, folder, .gguf or cached hub id) with `plan`'s compressed cache.

    engine_args go to `vllm.LLM` (kvc fills attention_backend, enable_prefix_caching=False,
    enforce_eager=True and max_model_len = the plan's max length unless given). vLLM picks its
    platform once per process, so call this before any other vLLM engine starts in the process.
    """
    from kvc.serving.vllm.engine import engine_settings

    folder, settings = engine_settings(model, plan, engine_args)
    check_platform()
    from vllm import LLM

    return LLM(str(folder), **settings)


def check_platform() -> None:
    """One error unless vLLM runs kvc's platform in this process (it chooses once, at first use)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        raise KvcError("vLLM is not installed; install kvc with `pip install 'kvc[vllm]'` "
                       "(scripts/install.sh shows how on a CPU-only machine)") from None
    if type(current_platform).__module__ != "kvc.serving.vllm.platform":
        raise KvcError(f"vLLM already runs its {type(current_platform).__name__} in this process, chosen before "
                       "a plan was given; start kvc's engine first, in a fresh process")
