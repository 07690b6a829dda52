"""The compile report: what a plan costs against the full cache and what it is expected to
recover, in total and per layer, as a JSON-ready mapping (`kvc compile --json`) and as the few
summary lines `kvc compile` prints under the plan's table.
"""

from __future__ import annotations

from collections import Counter

from kvc.compiler.sizes import format_size
from kvc.plan import Plan
from kvc.policies.kinds import KIND_BITS


def kind_names(plan: Plan) -> list[list[str]]:
    """(layers, kv_heads) kind names decoded from the plan's bitmasks."""
    return [["+".join(kind for kind, bit in KIND_BITS.items() if code & bit) for code in row]
            for row in plan.kind_codes.tolist()]


def plan_report(plan: Plan) -> dict:
    target = plan.target
    per_head = plan.head_bytes()
    full_layer = plan.full_cache_bytes / plan.num_layers
    kinds = kind_names(plan)
    layers = [{
        "layer": layer,
        "kinds": kinds[layer],
        "capacity": plan.capacity[layer].tolist(),
        "bytes": int(per_head[layer].sum()),
        "fraction_of_full": round(float(per_head[layer].sum()) / full_layer, 6),
        "expected_recovery": round(float(plan.expected_recovery[layer].mean()), 6),
        "head_recovery": [round(r, 6) for r in plan.expected_recovery[layer].tolist()],
    } for layer in range(plan.num_layers)]
    return {
        "model": plan.model_name,
        "fingerprint": plan.fingerprint,
        "strategy": plan.strategy,
        "kv_bits": plan.kv_bits,
        "merge_similarity": plan.merge_similarity,
        "merging_heads": int(plan.has("frequency").sum()) if plan.merge_similarity is not None else 0,
        "kept_tokens": round(float(plan.capacity.sum()) / (plan.num_layers * plan.num_kv_heads * target.max_len), 6),
        "target": vars(target).copy(),
        "cache_bytes": plan.cache_bytes,
        "kv_bytes": plan.kv_bytes,
        "score_bytes": plan.score_bytes,
        "position_bytes": plan.position_bytes,
        "overhead_bytes": plan.overhead_bytes,
        "full_cache_bytes": plan.full_cache_bytes,
        **sequence_bytes(plan),
        "fraction_of_full": round(plan.compression, 6),
        "compression_ratio": round(1 / plan.compression, 4),
        "budget_used": round(plan.cache_bytes / target.budget_bytes, 6) if target.budget_bytes else None,
        "expected_recovery": round(float(plan.expected_recovery.mean()), 6),
        "kinds": dict(sorted(Counter(kind for row in kinds for kind in row).items())),
        "notes": plan.notes,
        **({"tensor_parallel": rank_bytes(plan)} if plan.tensor_parallel_size > 1 else {}),
        "layers": layers,
    }


def sequence_bytes(plan: Plan) -> dict:
    """What one sequence holds (its slots, counters and scores: the plan is static, so at any length)
    and the length at which a full cache holds as much: shorter sequences take less uncompressed."""
    held = plan.cache_bytes_at(1) - plan.table_bytes
    full_per_token = plan.full_cache_bytes // (plan.target.max_len * plan.target.batch)
    return {"sequence_bytes": held, "break_even_tokens": -(-held // full_per_token)}


def sequence_line(report: dict) -> str:
    """What a sequence holds at any length, said against the full cache (`kvc show`, `kvc compile`)."""
    return (f"a sequence holds {format_size(report['sequence_bytes'])} at any length (the plan is static), as much as "
            f"a full cache of {report['break_even_tokens']:,} tokens: shorter sequences take less memory uncompressed "
            "(--max-len near the longest you serve keeps that low)")


def rank_bytes(plan: Plan) -> dict:
    """The slot bytes each tensor-parallel rank the plan was compiled for holds (its contiguous range of
    every layer's KV heads), and the largest over the mean."""
    ranks = plan.tensor_parallel_size
    totals = [int(plan.rank_slice(rank, ranks).head_bytes().sum()) for rank in range(ranks)]
    return {"ranks": ranks, "rank_bytes": totals, "largest_over_mean": round(max(totals) * ranks / sum(totals), 6)}


def summary_lines(report: dict) -> list[str]:
    """The totals and the strategy's own account of how it met (or could not meet) the target."""
    target = report["target"]
    lines = [(
        f"{report['strategy']} plan: {format_size(report['cache_bytes'])} against {format_size(report['full_cache_bytes'])} "
        f"for the full cache ({100 * report['fraction_of_full']:.2f}%, {report['compression_ratio']:.2f}x smaller) "
        f"at max length {target['max_len']}, batch {target['batch']}, {target['dtype']}"
    )]
    if report["kv_bits"]:
        share = report["kept_tokens"]
        lines.append(f"keys and values as {report['kv_bits']}-bit rows: the cache holds {100 * share:.1f}% of the "
                     f"tokens a full cache would (--kv-bits 0 keeps {target['dtype']})")
    if report["merging_heads"]:
        lines.append(f"evicted prompt tokens merged into the heavy hitter with the most similar key (cosine ≥ "
                     f"{report['merge_similarity']:g}; in a context prefilled before its questions, into any kept "
                     f"token but the sinks) in {report['merging_heads']} SnapKV-style heads "
                     "(--merge-similarity off drops them)")
    if report["budget_used"] is not None:
        lines.append(f"budget {format_size(target['budget_bytes'])}, {100 * report['budget_used']:.2f}% used · "
                     f"expected recovery {report['expected_recovery']:.4f}")
    notes = report["notes"]
    if "knapsack" in notes:
        bound = notes["knapsack"]["recovery_bound"]
        lines.append(f"knapsack: no plan within the budget can recover more than {bound:.4f} on average "
                     f"(this one is {bound - report['expected_recovery']:.5f} below)")
        if notes["knapsack"].get("saturated"):
            lines.append("every head already has its best option; more memory would not raise the recovery")
    if "fastgen" in notes:
        fastgen = notes["fastgen"]
        line = f"fastgen: threshold T = {fastgen['threshold']:.4f}"
        if "next_bytes" in fastgen:
            line += (f"; FastGen's rule moves in steps: the next one (T = {fastgen['next_threshold']:.4f}) "
                     f"needs {format_size(fastgen['next_bytes'])}, above the budget")
        lines.append(line)
    if "retrieval" in notes:
        retrieval = notes["retrieval"]
        heads = ", ".join(f"L{layer}.{head}" for layer, head in retrieval["heads"]) or "none"
        lines.append(f"retrieval: {len(retrieval['heads'])} KV heads with retrieval score >= {retrieval['threshold']} "
                     f"keep every token ({heads}); the others are SnapKV, {retrieval['window']} recent tokens "
                     "+ heavy hitters" + _budgets(retrieval))
    if "pyramid" in notes:
        lines.append(f"pyramid: PyramidKV schedule, β = {notes['pyramid']['beta']}, "
                     f"{notes['pyramid']['alpha']} recent tokens kept per head")
    if "tensor_parallel" in report:
        parallel = report["tensor_parallel"]
        low, high = min(parallel["rank_bytes"]), max(parallel["rank_bytes"])
        lines.append(f"compiled for {parallel['ranks']} tensor-parallel ranks, each with its share of the budget over "
                     f"its KV heads: {format_size(low)}" + (f" to {format_size(high)}" if high != low else "")
                     + f" of slots per rank (largest over mean {parallel['largest_over_mean']:.3f}x)")
    lines.append("heads per kind: " + ", ".join(f"{kind} {count}" for kind, count in report["kinds"].items()))
    return lines


def _budgets(retrieval: dict) -> str:
    """How the SnapKV heads' slots were shared (plans compiled before the probe curves say nothing)."""
    if retrieval.get("budgets") == "probe":
        low, high = retrieval["slots"]
        return f", {low}-{high} slots each by the policy's probe curves"
    if retrieval.get("budgets") == "equal":
        return ", equal budgets (the policy has no probe curves: profile again for budgets that follow them)"
    return ""
