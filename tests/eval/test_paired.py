"""kvc against the best published baseline prompt by prompt, on hand-made records: the opponent, the pairing,
the bootstrap interval, the verdict, and where they show (the table and the JSON)."""

import io
import json

import numpy as np
import pytest
from rich.console import Console

from kvc.eval import paired, report
from kvc.eval.fidelity import fidelity_metrics
from kvc.eval.records import Record, Results
from kvc.eval.settings import Settings

SETTING = "query-agnostic"


def record(method, sample, score, task="multikey", budget=0.1, metrics=None, setting=SETTING):
    return Record(task, method, budget, 1024, 0.5, score, 100, 1000, 1100, "", sample, setting, metrics)


def results_of(records, tasks=("multikey",)):
    methods = list(dict.fromkeys(r.method for r in records))
    return Results(Settings(tasks=list(tasks), methods=methods, budgets=[0.1], lengths=[1024], depths=[0.5],
                            setting=[SETTING]), records, 1.0)


def test_kvc_meets_the_baseline_with_the_best_mean_on_the_same_prompts():
    rng = np.random.default_rng(1)
    kvc = rng.uniform(0.6, 1.0, 12)
    records = [record("kvc", s, kvc[s]) for s in range(12)]
    records += [record("h2o", s, kvc[s] - 0.3) for s in range(12)]  # the stronger baseline, 0.3 behind on each
    records += [record("snapkv", s, 0.1) for s in range(12)]
    records += [record("kvc-merge", s, 0.0) for s in range(12)]  # kvc's variants are not opponents
    records += [record("h2o", 50, 1.0)]  # a prompt kvc did not answer is not paired
    (found,) = paired.comparisons(results_of(records))
    assert (found.baseline, found.prompts, found.measure, found.setting, found.budget) == ("h2o", 12, "multikey",
                                                                                          SETTING, 0.1)
    assert found.difference == pytest.approx(0.3) and found.kvc == pytest.approx(kvc.mean())
    assert found.low == pytest.approx(0.3) and found.high == pytest.approx(0.3)  # every draw's mean is 0.3
    assert (found.ahead, found.behind, found.verdict) == (12, 0, "kvc ahead")


def test_the_interval_says_when_the_prompts_cannot_tell_the_two_apart():
    differences = np.array([3, -2, 1, -1, 0, 2, -3, 1, -1, 0, 2, -2], float)  # mean 0
    records = [record("kvc", s, 5 + d) for s, d in enumerate(differences)]
    records += [record("h2o", s, 5.0) for s in range(len(differences))]
    (found,) = paired.comparisons(results_of(records))
    assert found.low < 0 < found.high and found.verdict == "within noise"
    assert (found.ahead, found.behind) == (5, 5)
    # the percentile bootstrap of the mean, drawn as the docstring says, with the same seed
    draws = np.random.default_rng(0).integers(0, 12, (paired.DRAWS, 12))
    assert (found.low, found.high) == pytest.approx(tuple(np.percentile(differences[draws].mean(1), [2.5, 97.5])))
    assert paired.comparisons(results_of(records)) == [found]  # seeded: the same records, the same interval
    behind = [record("kvc", s, 5 + d - 4) for s, d in enumerate(differences)]
    (lost,) = paired.comparisons(results_of(behind + records[len(differences):]))
    assert lost.high < 0 and lost.verdict == "h2o ahead"
    level = [record("kvc", s, 5.0) for s in range(len(differences))]  # the same score on every prompt
    (tie,) = paired.comparisons(results_of(level + records[len(differences):]))
    assert (tie.low, tie.high, tie.ahead, tie.behind, tie.verdict) == (0.0, 0.0, 0, 0, "level on every prompt")


def test_lower_is_better_for_perplexity_and_few_prompts_get_no_interval():
    records = [record("kvc", s, 10.0, task="ppl", setting=None) for s in range(10)]
    records += [record(m, s, value, task="ppl", setting=None) for s in range(10)
                for m, value in (("h2o", 12.0 + s % 2), ("streamingllm", 20.0))]
    (found,) = paired.comparisons(results_of(records, tasks=("ppl",)))
    assert found.baseline == "h2o" and found.difference == pytest.approx(-2.5)  # the lowest perplexity is the best
    assert found.high < 0 and (found.ahead, found.verdict) == (10, "kvc ahead")
    aware = paired.Comparison("query-aware", 0.1, "ppl", "h2o", 10, 10.0, 12.5, -2.5, -3.0, -2.0, 10, 0)
    titles = [table.title for table in report.paired_tables([found, aware])]  # a table per setting
    assert [title.split(", ")[1] for title in titles] == ["no question", "query-aware"]
    few = [r for r in records if r.sample < paired.MIN_PROMPTS - 1]
    (found,) = paired.comparisons(results_of(few, tasks=("ppl",)))
    assert found.low is found.high is None and found.verdict == "fewer than 10 prompts"


def test_fidelity_is_compared_by_its_share_of_tokens_its_first_difference_and_its_loops():
    full = list(range(40))
    records = []
    for sample in range(10):
        records.append(record("kvc", sample, 0, task="fidelity",
                              metrics=fidelity_metrics(full[:20] + list(range(100, 120)), full)))  # departs at 20
        records.append(record("h2o", sample, 0, task="fidelity",
                              metrics=fidelity_metrics(full[:5] + [99] * 35, full)))  # departs at 5, then loops
    records = [Record(**{**r.__dict__, "score": r.metrics["identical"]}) for r in records]
    found = {c.measure: c for c in paired.comparisons(results_of(records, tasks=("fidelity",)))}
    assert set(found) == {"fidelity", "fidelity_first_difference", "fidelity_new_loop"}
    assert found["fidelity_first_difference"].difference == pytest.approx(15.0)
    assert found["fidelity"].difference == pytest.approx(15 / 40)
    loops = found["fidelity_new_loop"]
    assert (loops.kvc, loops.other, loops.difference, loops.higher_is_better) == (0.0, 1.0, -1.0, False)
    assert all(c.verdict == "kvc ahead" for c in found.values())  # fewer loops is better


def test_the_comparison_is_the_report_s_last_table_and_in_its_json(tmp_path):
    records = [record(m, s, v) for s in range(10) for m, v in (("kvc", 0.5), ("snapkv", 0.25 + 0.5 * (s % 2)))]
    results = results_of(records)
    scores, comparisons = report.render(results).renderables  # the setting's scores, then kvc against the baseline
    assert "kvc eval, query-agnostic" in scores.title
    assert comparisons.title.startswith("kvc against the best published baseline, query-agnostic, prompt by prompt")
    table = comparisons.table
    assert [column.header for column in table.columns] == ["budget", "measure", "baseline", "kvc / it", "full cache",
                                                           "kvc − it (interval)", "ahead / behind", "verdict"]
    cells = [next(iter(column.cells)) for column in table.columns]
    assert cells[:5] + cells[6:] == ["10%", "multikey", "snapkv", "0.50 / 0.50", "-", "5 / 5 of 10", "within noise"]
    assert cells[5].startswith("0.00 (-0.") and cells[5].endswith(")")
    data = json.loads(report.write_json(results, tmp_path / "eval.json").read_text())
    (row,) = data["paired"]
    assert row["baseline"] == "snapkv" and row["prompts"] == 10 and row["verdict"] == "within noise"
    assert row["difference"] == pytest.approx(0.0) and row["low"] < 0 < row["high"]
    without_kvc = results_of([r for r in records if r.method != "kvc"])
    assert len(report.render(without_kvc).renderables) == 1  # no kvc, no comparison table


def test_the_full_cache_s_mean_stands_beside_and_a_lead_wholly_beyond_it_is_named():
    beyond = ", the full cache no better than either"
    records = [record("kvc", s, 0.1) for s in range(10)] + [record("pyramidkv", s, 0.5) for s in range(10)]
    full_of = lambda scores: [record("full", s, score, budget=1.0) for s, score in enumerate(scores)]  # noqa: E731
    (found,) = paired.comparisons(results_of(records + full_of([0.0, 0.2] * 5)))  # mean 0.1, level with kvc
    assert found.full == pytest.approx(0.1) and found.verdict == "pyramidkv ahead" + beyond
    cells = [next(iter(column.cells)) for column in report.paired_table([found], SETTING).columns]
    assert cells[4] == "0.10"
    (real,) = paired.comparisons(results_of(records + full_of([0.2] * 10)))  # kvc below the full cache, a real loss
    assert real.full == pytest.approx(0.2) and real.verdict == "pyramidkv ahead"
    (partial,) = paired.comparisons(results_of(records + full_of([0.0] * 9)))  # the full cache did not answer all
    assert partial.full is None and partial.verdict == "pyramidkv ahead"
    aware = [record("full", s, 0.0, budget=1.0, setting="query-aware") for s in range(10)]
    assert paired.comparisons(results_of(records + aware))[0].full is None  # another setting's full cache
    ppl = [record(m, s, value, task="ppl", setting=None) for s in range(10) for m, value in (("kvc", 9.0), ("h2o", 12.0))]
    for full_ppl, verdict in ((12.5, "kvc ahead" + beyond), (10.0, "kvc ahead")):  # lower is better
        full = [record("full", s, full_ppl, task="ppl", budget=1.0, setting=None) for s in range(10)]
        (found,) = paired.comparisons(results_of(ppl + full, tasks=("ppl",)))
        assert (found.full, found.verdict) == (full_ppl, verdict)


def test_a_console_too_narrow_for_the_table_gets_each_comparison_in_words():
    records = [record("kvc", s, 0.5) for s in range(10)] + [record("streamingllm", s, 0.25) for s in range(10)]
    records += [record("full", s, 0.5, budget=1.0) for s in range(10)]
    (comparisons,) = report.paired_tables(paired.comparisons(results_of(records)))
    printed = {}
    for width in (80, 200):
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(comparisons)
        printed[width] = console.export_text()
    assert "┃ budget ┃ measure" in printed[200] and "ahead on" not in printed[200]  # the table, one line a row
    assert "┃" not in printed[80] and max(map(len, printed[80].splitlines())) <= 80
    words = " ".join(printed[80].split())
    assert ("10% multikey kvc 0.50, streamingllm 0.25, full cache 0.50; kvc − streamingllm +0.25 (+0.25, +0.25), "
            "ahead on 10 and behind on 0 of 10 prompts: kvc ahead") in words


@pytest.mark.parametrize("value, digits, text", [(0.1234, 2, "+0.12"), (-0.1234, 2, "-0.12"), (-0.001, 2, "0.00"),
                                                 (-0.04, 1, "0.0"), (2.06, 1, "+2.1")])
def test_signed_differences_never_read_minus_zero(value, digits, text):
    assert report.signed(value, digits) == text


def test_reports_read_and_compare_results_without_torch():
    """Rendering and pairing saved results (`kvc.eval.report`, `benchmarks/paired_results.py`) loads no model library."""
    import subprocess
    import sys

    code = ("import sys\nimport kvc.eval.paired, kvc.eval.records, kvc.eval.report\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_benchmark_pools_runs_renames_their_methods_and_keeps_a_repeated_prompt_once(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    first = [record(m, s, v) for s in range(6) for m, v in (("kvc", 1.0 if s < 4 else 0.5), ("h2o", 0.0))]
    first += [record("full", s, 0.75, budget=1.0) for s in range(10)]
    later = [record(m, s, v) for s in range(4, 10) for m, v in (("kvc-merge", 1.0), ("kvc", 0.0), ("h2o", 0.0))]
    report.write_json(results_of(first), tmp_path / "a.json")
    report.write_json(results_of(later), tmp_path / "b.json")
    script = Path(__file__).parents[2] / "benchmarks" / "paired_results.py"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "a.json"),
                          f"{tmp_path / 'b.json'}:kvc-merge=kvc,kvc=kvc-drop", "--budgets", "0.1",
                          "--out", str(tmp_path / "p.json")],
                         capture_output=True, text=True, check=True)
    assert "kvc ahead" in run.stdout
    (row,) = json.loads((tmp_path / "p.json").read_text())["paired"]
    # samples 0-9 once each: 4 and 5 (0.5) from a.json, the first file, b.json's kvc-merge (1.0) as kvc for 6-9
    assert (row["prompts"], row["kvc"], row["other"], row["verdict"]) == (10, pytest.approx(0.9), 0.0, "kvc ahead")
    assert row["full"] == pytest.approx(0.75)  # the full cache's records (budget 100%) survive --budgets
    empty = subprocess.run([sys.executable, str(script), str(tmp_path / "b.json"), "--tasks", "fwe"],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.strip().startswith(
        "no prompt answered by both kvc and one of streamingllm, h2o")
    against = subprocess.run([sys.executable, str(script), str(tmp_path / "b.json"), "--against", "kvc-merge",
                              "--out", str(tmp_path / "v.json")], capture_output=True, text=True, check=True)
    assert "kvc against kvc-merge, query-agnostic" in against.stdout  # kvc 0.0 against its variant's 1.0 on 4-9
    (row,) = json.loads((tmp_path / "v.json").read_text())["paired"]
    assert (row["baseline"], row["prompts"], row["kvc"], row["other"]) == ("kvc-merge", 6, 0.0, 1.0)


def test_a_variant_of_kvc_s_plan_can_be_the_opponent_instead_of_the_baselines():
    records = [record("kvc", s, 0.5) for s in range(12)]
    records += [record("h2o", s, 0.9) for s in range(12)] + [record("kvc-merge", s, 0.4 + s % 3 * 0.1) for s in range(12)]
    (found,) = paired.comparisons(results_of(records), rivals=("kvc-merge",))
    assert (found.baseline, found.other, found.difference) == ("kvc-merge", pytest.approx(0.5), pytest.approx(0.0))
    assert (found.ahead, found.behind, found.verdict) == (4, 4, "within noise")
    (published,) = paired.comparisons(results_of(records))
    assert published.baseline == "h2o"  # by default only the published baselines are opponents


def test_each_budget_meets_its_own_best_baseline_whoever_the_others_met():
    records = [record("kvc", s, 0.5, budget=b) for s in range(10) for b in (0.1, 0.25)]
    records += [record("h2o", s, 0.4, budget=0.1) for s in range(10)]  # only H2O ran at 10%
    records += [record("snapkv", s, 0.6, budget=0.25) for s in range(10)]  # only SnapKV at 25%
    found = {c.budget: c for c in paired.comparisons(results_of(records))}
    assert (found[0.1].baseline, found[0.25].baseline) == ("h2o", "snapkv")
