"""The compiler: a policy and a deployment target in, a static KV-cache plan out.

`compile_policy(policy, target=0.25, max_len=..., strategy="knapsack")` returns a `Plan`;
`plan_report(plan)` says what it costs and is expected to recover, in total and per layer.
Its names load on first use, so its torch-free modules (sizes, outputs) import without torch.
"""

from kvc.lazy import lazy_names

__getattr__ = lazy_names(__name__, {
    "STRATEGIES": "kvc.compiler.compile", "compile_policy": "kvc.compiler.compile",
    "plan_report": "kvc.compiler.report", "summary_lines": "kvc.compiler.report", "parse_size": "kvc.compiler.sizes"})

__all__ = ["STRATEGIES", "compile_policy", "parse_size", "plan_report", "summary_lines"]
