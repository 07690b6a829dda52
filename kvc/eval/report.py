"""What an evaluation shows: a table of method x budget x task, the JSON of every record, a Pareto plot.

Scores are means over depths, lengths and samples (passkey: share right; niah: share of the needle's
facts named; ppl: perplexity, with its ratio to the full cache's). The plot puts each method's
actual cache bytes against its score, one panel per task.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

from rich.table import Table

from kvc.compiler.sizes import format_size as human_bytes
from kvc.eval.harness import TASKS, Results
from kvc.files import atomic_write_bytes, atomic_write_text


def summary(results: Results) -> list[dict]:
    """One row per (method, budget): mean cache bytes and, per task, the mean score."""
    scores, sizes = defaultdict(list), defaultdict(list)
    for record in results.records:
        scores[(record.method, record.budget, record.task)].append(record.score)
        sizes[(record.method, record.budget)].append(record.cache_bytes)
    rows = []
    for (method, budget), cache in sizes.items():
        row = {"method": method, "budget": budget, "cache_bytes": round(sum(cache) / len(cache))}
        for task in results.settings.tasks:
            values = scores.get((method, budget, task))
            row[task] = sum(values) / len(values) if values else None
        rows.append(row)
    return rows


def render(results: Results) -> Table:
    rows = summary(results)
    reference = next((row for row in rows if row["method"] == "full"), None)
    table = Table(title=f"kvc eval: {', '.join(results.settings.tasks)} at lengths "
                        f"{', '.join(map(str, results.settings.lengths))} ({results.settings.dtype} cache, "
                        f"{results.seconds:.0f} s)")
    table.add_column("method", no_wrap=True)
    table.add_column("budget", justify="right")
    table.add_column("cache", justify="right")
    for task in results.settings.tasks:
        table.add_column(task, justify="right")
    for row in rows:
        cells = [cell(row[task], reference and reference[task], TASKS[task].higher_is_better)
                 for task in results.settings.tasks]
        table.add_row(row["method"], f"{row['budget']:.0%}", human_bytes(row["cache_bytes"]), *cells)
    return table


def cell(score: float | None, reference: float | None, higher_is_better: bool) -> str:
    if score is None:
        return "-"
    if higher_is_better:
        return f"{score:.2f}"
    return f"{score:.2f} ({score / reference:.2f}x)" if reference else f"{score:.2f}"


def write_json(results: Results, path, **extra) -> Path:
    """Every record, the settings and the summary table; `extra` adds top-level fields."""
    data = results.to_dict() | {"summary": summary(results)} | extra
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def draw(results: Results, path) -> Path:
    """Pareto plot: mean cache bytes (MiB) against mean score, one panel per task, a line per method
    through its budgets (perplexity on a log scale: a collapsed method would flatten the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(results)
    tasks = results.settings.tasks
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + 1.5, 4), squeeze=False)
    methods = list(dict.fromkeys(row["method"] for row in rows))
    markers = "osD^v<>PX*"
    for axis, task in zip(axes[0], tasks):
        for index, method in enumerate(methods):
            points = sorted((row["cache_bytes"] / 2**20, row[task]) for row in rows
                            if row["method"] == method and row[task] is not None)
            if points:
                axis.plot(*zip(*points), color=f"C{index}", marker=markers[index % len(markers)], alpha=0.8,
                          label=method)
        axis.set_xlabel("cache (MiB)")
        if not TASKS[task].higher_is_better:
            axis.set_yscale("log")
        axis.set_ylabel("perplexity (lower is better)" if not TASKS[task].higher_is_better else "score")
        axis.set_title(task)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())
