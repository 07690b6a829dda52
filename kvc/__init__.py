"""kvc: a KV-cache compiler. Profile a model's attention heads, compile a plan for a memory
target, and run the plan inside Hugging Face transformers."""

__version__ = "0.1.0"

from kvc.lazy import lazy_names  # noqa: E402

# Every name loads on first use (kvc.lazy says why).
__getattr__ = lazy_names("kvc", {
    "compile_policy": "kvc.compiler", "KvcError": "kvc.policies.errors", "Policy": "kvc.policies.schema",
    "load_policy": "kvc.policies.schema", "save_policy": "kvc.policies.schema", "apply": "kvc.runtime.apply",
    "restore": "kvc.runtime.apply", "CompressedCache": "kvc.runtime.cache", "CompressedKV": "kvc.runtime.standalone",
    "generate": "kvc.runtime.generate"})

__all__ = ["CompressedCache", "CompressedKV", "KvcError", "Policy", "__version__", "apply", "compile_policy",
           "generate", "load_policy", "restore", "save_policy"]
