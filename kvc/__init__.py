"""kvc: a KV-cache compiler. Profile a model's attention heads, compile a plan for a memory
target, and run the plan inside Hugging Face transformers."""

__version__ = "0.1.0"

from kvc.compiler import compile_policy
from kvc.policies.errors import KvcError
from kvc.policies.schema import Policy, load_policy, save_policy

# The runtime imports transformers and triton (seconds): its names load on first use.
_RUNTIME = {"apply": "kvc.runtime.apply", "restore": "kvc.runtime.apply", "CompressedCache": "kvc.runtime.cache",
            "CompressedKV": "kvc.runtime.standalone", "generate": "kvc.runtime.generate"}


def __getattr__(name):
    if name in _RUNTIME:
        import importlib

        return getattr(importlib.import_module(_RUNTIME[name]), name)
    raise AttributeError(f"module 'kvc' has no attribute {name!r}")


__all__ = ["CompressedCache", "CompressedKV", "KvcError", "Policy", "__version__", "apply", "compile_policy",
           "generate", "load_policy", "restore", "save_policy"]
