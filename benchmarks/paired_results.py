"""kvc against the best published baseline, prompt by prompt, over the records of several `kvc eval` runs.

`kvc eval` prints this comparison for the prompts of one run (`kvc.eval.paired`); prompts evaluated
over several runs (ten samples, then twenty more) are compared here, their records pooled. A
prompt evaluated twice for the same method keeps its first file's record (the files in the order
given). `FILE:kvc-merge=kvc,kvc=kvc-drop` renames that file's methods first (what an earlier run
called the plan kvc now compiles by default, and kvc's plan of then); `--tasks` and `--budgets`
keep a part of the records (the full cache's stay with any budget: the table shows them beside each
comparison); `--against kvc-merge` compares kvc with that method (a variant of its plan) instead of
the best baseline. Prints the table and writes the comparisons as JSON.

    .venv/bin/python benchmarks/paired_results.py benchmarks/results/eval_aware_ten_1024.json \\
        benchmarks/results/eval_aware_more_1024.json --tasks fwe --budgets 0.5 --out paired.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from kvc.eval import paired, report
from kvc.eval.records import Results, read_record
from kvc.files import atomic_write_text


def source(argument: str) -> tuple[Path, dict[str, str]]:
    """FILE or FILE:OLD=NEW,...: a results file and the methods to rename in it."""
    path, _, renames = argument.partition(":")
    return Path(path), dict(pair.split("=", 1) for pair in renames.split(",") if pair)


def pooled(sources: list[tuple[Path, dict[str, str]]], tasks: set[str] | None, budgets: set[float] | None) -> Results:
    """The records of every file (renamed, filtered), the first of any repeated cell kept, under the first file's settings."""
    first, records, seen = None, [], set()
    for path, rename in sources:
        data = json.loads(path.read_text())
        first = first or data
        for record in map(read_record, data["records"]):
            record.method = rename.get(record.method, record.method)
            if (tasks and record.task not in tasks) or (budgets and record.method != paired.FULL and record.budget not in budgets):
                continue
            if record.cell() not in seen:
                seen.add(record.cell())
                records.append(record)
    results = Results.from_dict(first | {"records": []})
    results.records = records
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="kvc eval JSON files, each FILE or FILE:OLD=NEW,... to rename methods")
    parser.add_argument("--tasks", default="", help="comma-separated tasks to keep (default: all)")
    parser.add_argument("--budgets", default="", help="comma-separated budgets to keep (default: all)")
    parser.add_argument("--against", default="", help="comma-separated methods to compare kvc with instead of the "
                        "published baselines (the best of them by mean)")
    parser.add_argument("--out", type=Path, help="write the comparisons here as JSON")
    args = parser.parse_args()
    sources = [source(argument) for argument in args.files]
    tasks = {task for task in args.tasks.split(",") if task} or None
    budgets = {float(budget) for budget in args.budgets.split(",") if budget} or None
    against = tuple(method for method in args.against.split(",") if method)
    rivals, opponent = against or paired.PUBLISHED, ", ".join(against) or report.BEST_BASELINE
    found = paired.comparisons(pooled(sources, tasks, budgets), rivals)
    if not found:
        print(f"no prompt answered by both kvc and one of {', '.join(rivals)} in these records", file=sys.stderr)
        raise SystemExit(2)
    for table in report.paired_tables(found, opponent):
        Console(width=200).print(table)
    if args.out:
        atomic_write_text(args.out, json.dumps({"files": args.files, "against": list(rivals),
                                                "paired": [c.to_dict() for c in found]},
                                               indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
