"""kvc: a KV-cache compiler. Profile a model's attention heads, compile a plan for a memory
target, and run the plan inside Hugging Face transformers."""

__version__ = "0.1.0"

# Every name loads on first use: the compiler and policies import torch, the runtime transformers
# and triton (seconds each), and `kvc --help` or a refused command needs none of them.
_NAMES = {"compile_policy": "kvc.compiler", "KvcError": "kvc.policies.errors", "Policy": "kvc.policies.schema",
          "load_policy": "kvc.policies.schema", "save_policy": "kvc.policies.schema",
          "apply": "kvc.runtime.apply", "restore": "kvc.runtime.apply", "CompressedCache": "kvc.runtime.cache",
          "CompressedKV": "kvc.runtime.standalone", "generate": "kvc.runtime.generate"}


def __getattr__(name):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'kvc' has no attribute {name!r}")


__all__ = ["CompressedCache", "CompressedKV", "KvcError", "Policy", "__version__", "apply", "compile_policy",
           "generate", "load_policy", "restore", "save_policy"]
