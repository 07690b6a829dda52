"""kvc's worker: vLLM's CPU worker, with each attention layer's KV-cache spec its plan page.

The backend's `customize_spec` cannot give a layer its page (it is not told which layer it is
asked about); the worker knows every layer by name. It also publishes the model runner's
input-id buffer to the backend: token classes need the batch's token ids.
"""

from __future__ import annotations

from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.worker.cpu_worker import CPUWorker

from kvc.serving.vllm.backend import watch_token_ids
from kvc.serving.vllm.pages import block_pages
from kvc.serving.vllm.plans import all_rank_plans, rank_plan
from kvc.serving.vllm.spec import plan_spec


class KvcCPUWorker(CPUWorker):
    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        watch_token_ids(self.model_runner.input_ids.gpu)

    def get_kv_cache_spec(self):
        pages = block_pages(all_rank_plans())  # the same on every rank
        return {name: plan_spec(rank_plan(), pages, extract_layer_index(name), spec)
                for name, spec in super().get_kv_cache_spec().items()}
