"""The per-setting score table on hand-made records: whole in a wide console, folded into parts that each repeat
method, budget and cache in a narrow one, never a cut header."""

import io

from rich.console import Console

from kvc.eval import report
from kvc.eval.records import Record, Results
from kvc.eval.settings import Settings

TASKS = ["passkey", "niah", "multikey", "multivalue", "vartrack", "fwe"]
METHODS = {"full": 1.0, "kvc": 0.1, "streamingllm": 0.1, "pyramidkv": 0.1}


def printed(results: Results, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(report.render(results).renderables[0])  # the scores, not kvc against the baselines
    return console.export_text()


def test_a_console_too_narrow_for_every_task_gets_the_scores_in_parts_with_whole_headers():
    records = [Record(task, method, budget, 4096, 0.5, (index + 1) / 100 + 0.1 * column, 47_300_000 * budget,
                      96_200_000, 4200, "", 0, "query-aware", None)
               for column, task in enumerate(TASKS) for index, (method, budget) in enumerate(METHODS.items())]
    results = Results(Settings(tasks=TASKS, methods=list(METHODS), budgets=[0.1], lengths=[4096], depths=[0.5],
                               setting=["query-aware"]), records, 1.0)
    wide, narrow = printed(results, 200), printed(results, 80)
    headers = lambda text: [line for line in text.splitlines() if "┃ method" in line]  # noqa: E731
    assert len(headers(wide)) == 1 and all(f" {task} " in headers(wide)[0] for task in TASKS)
    assert len(headers(narrow)) == 2 and max(map(len, narrow.splitlines())) <= 80 and "…" not in narrow
    assert all(sum(f" {task} " in line for line in headers(narrow)) == 1 for task in TASKS)  # each task once, whole
    assert narrow.count("kvc eval, query-aware") == 1  # the title once, over the first part
    for part in narrow.split("┃ method")[1:]:  # each part: every method's row with its budget and cache
        assert all(f"│ {method} " in part for method in METHODS) and "│    10% │  4.51 MiB │" in part
    cells = lambda text: sorted(float(cell) for line in text.splitlines() if line.startswith("│")  # noqa: E731
                                for cell in line.split("│")[4:-1] if cell.strip())
    assert cells(narrow) == cells(wide) and len(cells(wide)) == len(METHODS) * (len(TASKS) + 1)  # + the RULER mean
