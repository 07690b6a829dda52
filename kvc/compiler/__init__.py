"""The compiler: a policy and a deployment target in, a static KV-cache plan out.

`compile_policy(policy, target=0.25, max_len=..., strategy="knapsack")` returns a `Plan`;
`plan_report(plan)` says what it costs and is expected to recover, in total and per layer.
"""

from kvc.compiler.compile import STRATEGIES, compile_policy
from kvc.compiler.report import plan_report, summary_lines
from kvc.compiler.sizes import parse_size

__all__ = ["STRATEGIES", "compile_policy", "parse_size", "plan_report", "summary_lines"]
