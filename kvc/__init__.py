"""kvc: a KV-cache compiler. Profile a model's attention heads, compile a plan for a memory
target, and run the plan inside Hugging Face transformers."""

__version__ = "0.1.0"

from kvc.policies.errors import KvcError
from kvc.policies.schema import Policy, load_policy, save_policy

__all__ = ["KvcError", "Policy", "load_policy", "save_policy", "__version__"]
