"""kvc's platform for vLLM's CPU build (chosen by `plugins.platform_plugin`).

A subclass of vLLM's CPU platform (whose `get_attn_backend_cls` always picks its own backend). While
KVC_VLLM_PLAN names a plan it picks kvc's backend for every attention layer, checks the plan against
the engine's settings, turns prefix caching off, registers the plan's KV-cache spec and manager,
and runs kvc's worker (`worker.py`).
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from kvc.policies.errors import KvcError
from kvc.serving.vllm.plans import plan_requested, served_plan
from kvc.serving.vllm.plugins import BACKEND, WORKER


class KvcCpuPlatform(CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if not plan_requested():
            return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            raise KvcError("kvc serves plans of models with plain multi-head (GQA) attention, not MLA or sparse attention")
        return BACKEND

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        from kvc.serving.vllm.engine import check_engine

        super().check_and_update_config(vllm_config)
        if not plan_requested():
            return
        if vllm_config.model_config is not None:
            check_engine(served_plan(), vllm_config)
        vllm_config.cache_config.enable_prefix_caching = False
        vllm_config.parallel_config.worker_cls = WORKER

    @classmethod
    def register_custom_kv_cache_specs(cls, vllm_config) -> None:
        from kvc.serving.vllm.spec import register

        register()
