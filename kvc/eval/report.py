"""What an evaluation shows: per setting a table of method x budget x task (in a console too narrow for it, its task
columns folded into several tables, each starting with method, budget and cache), the JSON of every record, a Pareto plot.

Scores are means over depths, lengths and samples (passkey: share right; niah: share of the needle's
facts named; the RULER-style tasks: share of the expected strings named; fidelity: share of tokens
identical to the full cache's answer, with the first differing position, the repeated 4-grams and
the share of answers that loop where the full cache's does not;
ppl: perplexity, with its ratio to the full cache's). Where kvc and a published baseline answered
the same prompts, a last table compares kvc with the strongest of them prompt by prompt
(`kvc.eval.paired`: the mean difference, its 95% bootstrap interval, and whether the prompts can
tell the two apart, beside the full cache's mean on the same prompts), one table per setting, or,
in a console too narrow for the table, each comparison in words. The
plot puts each method's actual cache bytes against its score, one panel per task and setting.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.table import Table

from kvc.compiler.sizes import format_size as human_bytes
from kvc.eval import paired
from kvc.eval.records import Results
from kvc.eval.settings import LOWER_IS_BETTER
from kvc.files import atomic_write_bytes, atomic_write_text


RULER_TASKS = ("multikey", "multivalue", "vartrack", "fwe")
# beside the share of identical tokens, which is the fidelity score
FIDELITY_COLUMNS = ("first_difference", "repetition", "new_loop")
UNBOUNDED = 10_000  # a console width no table reaches


def columns(results: Results) -> list[str]:
    """The summary's score columns: each task, the RULER-style mean, the fidelity metrics."""
    tasks = results.settings.tasks
    ruler = ["ruler"] if sum(task in RULER_TASKS for task in tasks) > 1 else []
    fidelity = [f"fidelity_{name}" for name in FIDELITY_COLUMNS] if "fidelity" in tasks else []
    return [*tasks, *ruler, *fidelity]


def summary(results: Results) -> list[dict]:
    """One row per (setting, method, budget): mean cache bytes and, per task, the mean score.

    A task without a question (ppl, recovery) shows in every setting's rows; `ruler` is the mean
    of the RULER-style tasks' means, fidelity_* the means of the fidelity metrics."""
    scores, sizes = defaultdict(list), defaultdict(list)
    settings = results.settings.setting
    for record in results.records:
        for setting in settings if record.setting is None else [record.setting]:
            scores[(setting, record.method, record.budget, record.task)].append(record.score)
            sizes[(setting, record.method, record.budget)].append(record.cache_bytes)
            for name, value in (record.metrics or {}).items():
                scores[(setting, record.method, record.budget, f"{record.task}_{name}")].append(value)
    rows = []
    for (setting, method, budget), cache in sizes.items():
        row = {"setting": setting, "method": method, "budget": budget, "cache_bytes": round(sum(cache) / len(cache))}
        for column in columns(results):
            values = scores.get((setting, method, budget, column))
            row[column] = sum(values) / len(values) if values else None
        if "ruler" in row:
            means = [row[task] for task in RULER_TASKS if row.get(task) is not None]
            row["ruler"] = sum(means) / len(means) if means else None
        rows.append(row)
    return rows


def render(results: Results) -> Group:
    """One table per setting (tasks without a question repeat in each), then kvc against the best baseline in each."""
    rows = summary(results)
    tables = [SettingScores(results, [row for row in rows if row["setting"] == setting], setting)
              for setting in results.settings.setting if any(row["setting"] == setting for row in rows)]
    return Group(*tables, *paired_tables(paired.comparisons(results)))


def setting_table(results: Results, rows: list[dict], setting: str, names: list[str] | None = None) -> Table:
    """The setting's scores in the columns `names` (default: every score column) beside method, budget and cache."""
    reference = next((row for row in rows if row["method"] == "full"), None)
    names = columns(results) if names is None else names
    table = Table(title=f"kvc eval, {setting}: {', '.join(results.settings.tasks)} at lengths "
                        f"{', '.join(map(str, results.settings.lengths))} ({results.settings.dtype} cache, "
                        f"{results.seconds:.0f} s)")
    table.add_column("method", no_wrap=True)
    table.add_column("budget", justify="right")
    table.add_column("cache", justify="right")
    for name in names:
        table.add_column(HEADERS.get(name, name), justify="right")
    for row in rows:
        cells = [cell(row[name], reference and reference[name], name) for name in names]
        table.add_row(row["method"], f"{row['budget']:.0%}", human_bytes(row["cache_bytes"]), *cells)
    return table


def natural_width(console: Console, options: ConsoleOptions, table: Table) -> int:
    """The width a table takes when nothing clamps it."""
    return Measurement.get(console, options.update_width(UNBOUNDED), table).maximum


class SettingScores:
    """One setting's scores: one table where the console is wide enough for it, else its score columns folded into as
    many tables as it takes, each starting with method, budget and cache (every task's header cut to three letters
    in an 80-column terminal: 'mul…' could be multikey or multivalue)."""

    def __init__(self, results: Results, rows: list[dict], setting: str):
        self.results, self.rows, self.setting = results, rows, setting
        self.table = setting_table(results, rows, setting)
        self.title = self.table.title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        groups: list[list[str]] = [[]]
        for name in columns(self.results):
            wider = setting_table(self.results, self.rows, self.setting, groups[-1] + [name])
            if groups[-1] and natural_width(console, options, wider) > options.max_width:
                groups.append([name])
            else:
                groups[-1].append(name)
        for index, group in enumerate(groups):
            table = setting_table(self.results, self.rows, self.setting, group)
            if index:
                table.title = None  # the first part names the setting
            yield table


BEST_BASELINE = "the best published baseline"


def paired_table(found: list[paired.Comparison], setting: str | None, opponent: str = BEST_BASELINE) -> Table:
    """kvc against the best baseline (or `opponent`) in one setting (None: the tasks without a question)."""
    table = Table(title=f"kvc against {opponent}, {setting or 'no question'}, prompt by prompt "
                        f"({paired.LEVEL:.0%} bootstrap interval)")
    for name in ("budget", "measure", "baseline", "kvc / it", "full cache", "kvc − it (interval)", "ahead / behind",
                 "verdict"):
        table.add_column(name, justify="right" if name in ("budget", "kvc / it", "full cache") else "left")
    for c in found:
        digits = digits_of(c)
        table.add_row(f"{c.budget:.0%}", PAIRED_MEASURES.get(c.measure, c.measure), c.baseline,
                      f"{c.kvc:.{digits}f} / {c.other:.{digits}f}", "-" if c.full is None else f"{c.full:.{digits}f}",
                      signed(c.difference, digits) + interval_of(c), f"{c.ahead} / {c.behind} of {c.prompts}", c.verdict)
    return table


def paired_tables(found: list[paired.Comparison], opponent: str = BEST_BASELINE) -> list[PairedComparisons]:
    """One table (or, in a narrow console, its comparisons in words) per setting the comparisons are in."""
    settings = list(dict.fromkeys(c.setting for c in found))
    return [PairedComparisons([c for c in found if c.setting == setting], setting, opponent) for setting in settings]


class PairedComparisons:
    """One setting's comparisons: the table where the console is wide enough for it, else each comparison in words
    (the table's eight columns wrap every cell in an 80-column terminal)."""

    def __init__(self, found: list[paired.Comparison], setting: str | None, opponent: str = BEST_BASELINE):
        self.found, self.table = found, paired_table(found, setting, opponent)
        self.title = self.table.title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if natural_width(console, options, self.table) <= options.max_width:
            yield self.table
            return
        lines = Table.grid(padding=(0, 2), pad_edge=True)
        lines.title = self.title
        lines.add_column(no_wrap=True)
        lines.add_column()
        for c in self.found:
            lines.add_row(f"{c.budget:.0%} {PAIRED_MEASURES.get(c.measure, c.measure)}", paired_line(c))
        yield lines


def paired_line(c: paired.Comparison) -> str:
    """A comparison in words: 'kvc 0.90, snapkv 0.65, full cache 0.90; kvc − snapkv +0.25 (+0.10, +0.40), ahead on 5
    and behind on 0 of 10 prompts: kvc ahead'."""
    digits = digits_of(c)
    full = "" if c.full is None else f", full cache {c.full:.{digits}f}"
    return (f"kvc {c.kvc:.{digits}f}, {c.baseline} {c.other:.{digits}f}{full}; kvc − {c.baseline} "
            f"{signed(c.difference, digits) + interval_of(c)}, ahead on {c.ahead} and behind on {c.behind} of {c.prompts} "
            f"prompts: {c.verdict}")


def digits_of(c: paired.Comparison) -> int:
    """Tokens to the first difference to a tenth, shares to a hundredth."""
    return 1 if c.measure == paired.FIRST_DIFFERENCE else 2


def interval_of(c: paired.Comparison) -> str:
    """' (low, high)' of the difference's bootstrap interval; none below MIN_PROMPTS prompts."""
    return "" if c.low is None else f" ({signed(c.low, digits_of(c))}, {signed(c.high, digits_of(c))})"


def signed(value: float, digits: int) -> str:
    """+0.12, -0.12, and 0.00 for what rounds to zero (no -0.00)."""
    rounded = round(value, digits)
    return f"{rounded:+.{digits}f}" if rounded else f"{0:.{digits}f}"


HEADERS = {"fidelity": "fidelity (same tokens)", "fidelity_first_difference": "first diff",
           "fidelity_repetition": "4-gram rep", "fidelity_new_loop": "new loops", "ruler": "ruler mean"}
PAIRED_MEASURES = HEADERS | {"fidelity": "same tokens"}  # the fidelity score, named beside its other measures


def cell(score: float | None, reference: float | None, column: str) -> str:
    if score is None:
        return "-"
    if column == "fidelity_first_difference":
        return f"{score:.1f}"
    if column in LOWER_IS_BETTER:
        return f"{score:.2f} ({score / reference:.2f}x)" if reference else f"{score:.2f}"
    return f"{score:.2f}"


def write_json(results: Results, path, **extra) -> Path:
    """Every record, the settings, the summary table and kvc's paired comparisons; `extra` adds top-level fields."""
    data = (results.to_dict() | {"summary": summary(results)}
            | {"paired": [c.to_dict() for c in paired.comparisons(results)]} | extra)
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def draw(results: Results, path) -> Path:
    """Pareto plot: mean cache bytes (MiB) against mean score, one panel per task and setting, a line per method
    through its budgets (perplexity on a log scale: a collapsed method would flatten the rest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(results)
    tasks, settings = results.settings.tasks, list(dict.fromkeys(row["setting"] for row in rows))
    figure, axes = plt.subplots(len(settings), len(tasks), figsize=(4.5 * len(tasks) + 1.5, 4 * len(settings)),
                                squeeze=False)
    methods = list(dict.fromkeys(row["method"] for row in rows))
    markers = "osD^v<>PX*"
    for line, setting in zip(axes, settings):
        for axis, task in zip(line, tasks):
            for index, method in enumerate(methods):
                points = sorted((row["cache_bytes"] / 2**20, row[task]) for row in rows
                                if row["setting"] == setting and row["method"] == method and row[task] is not None)
                if points:
                    axis.plot(*zip(*points), color=f"C{index}", marker=markers[index % len(markers)], alpha=0.8,
                              label=method)
            axis.set_xlabel("cache (MiB)")
            if task in LOWER_IS_BETTER:
                axis.set_yscale("log")
            axis.set_ylabel("perplexity (lower is better)" if task in LOWER_IS_BETTER else "score")
            axis.set_title(f"{task}, {setting}")
            axis.grid(alpha=0.3)
    labelled = {label: handle for axis in axes.flat for handle, label in zip(*axis.get_legend_handles_labels())}
    axes[0][-1].legend(labelled.values(), labelled.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())
