"""kvc's vLLM plugins (entry points in pyproject.toml); they change nothing until KVC_VLLM_PLAN names a plan.

`kvc serve` and `llm()` set it. The general plugin then registers kvc's backend as CUSTOM in every
vLLM process. The platform plugin puts kvc's platform (`platform.KvcCpuPlatform`) in place of
vLLM's CPU platform; it behaves as vLLM's own until a plan is served (vLLM picks its platform at
first use, which may come before the plan is known). Nothing of vLLM is imported here at module
level: vLLM loads this module while it is still choosing its platform.
"""

from __future__ import annotations

BACKEND = "kvc.serving.vllm.backend.KvcAttentionBackend"
WORKER = "kvc.serving.vllm.worker.KvcCPUWorker"
PLATFORM = "kvc.serving.vllm.platform.KvcCpuPlatform"


def general_plugin() -> None:
    """Entry point `vllm.general_plugins`: register kvc's backend as CUSTOM (in every vLLM process)."""
    from kvc.serving.vllm.plans import plan_requested

    if plan_requested():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CUSTOM, BACKEND)


def platform_plugin() -> str | None:
    """Entry point `vllm.platform_plugins`: kvc's platform on vLLM's CPU build (it is vLLM's own CPU
    platform until a plan is served, so that vLLM may pick it before the plan is known)."""
    from vllm.platforms import cpu_platform_plugin

    return PLATFORM if cpu_platform_plugin() is not None else None
