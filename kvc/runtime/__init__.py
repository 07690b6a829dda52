"""Runtime: executes a compiled KV-cache memory plan (flat per-layer cache, kernels)."""
