"""Serving engines that run kvc plans (vLLM: `kvc.serving.vllm`)."""
