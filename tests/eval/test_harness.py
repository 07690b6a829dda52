"""The harness end to end on the embedded model, its report files, and the `kvc eval` error paths."""

import json
import math

import pytest
import torch

from kvc.cli import main
from kvc.eval import report
from kvc.eval.baselines import method_plan
from kvc.eval.fidelity import fidelity_metrics
from kvc.eval.harness import Sample, evaluate, given_plan, run_perplexity
from kvc.eval.records import Record, Results
from kvc.eval.perplexity import perplexity_sample
from kvc.eval.settings import Settings
from kvc.policies.errors import KvcError


@pytest.fixture(scope="module")
def results(smollm):
    settings = Settings(tasks=["passkey"], methods=["full", "streamingllm"], budgets=[0.25], lengths=[400],
                        depths=[0.0, 0.5], answer_tokens=8, samples=2, setting=["query-aware"])
    return evaluate(smollm, settings, show_progress=False)


def test_every_sample_runs_through_every_method_at_its_bytes(results):
    records = results.records
    assert [(r.method, r.budget, r.sample, r.depth, r.setting) for r in records] == [
        (method, budget, sample, depth, "query-aware") for sample in (0, 1) for depth in (0.0, 0.5)
        for method, budget in (("full", 1.0), ("streamingllm", 0.25))]  # one prefill per sample serves both
    assert len({r.completion[:6] for r in records if r.method == "full"}) == 2  # two passkeys
    for record in records:
        assert record.max_len > 400 and record.full_bytes > 0
        if record.method == "streamingllm":
            assert record.cache_bytes <= 0.25 * record.full_bytes
    full = [r for r in records if r.method == "full"]
    assert all(r.score == 1.0 for r in full)  # the embedded model finds the key with its whole cache
    assert all(r.score in (0.0, 1.0) and r.completion for r in records)


def test_report_table_json_and_png(results, tmp_path):
    (scores,) = report.render(results).renderables  # one setting, one table
    assert [column.header for column in scores.table.columns] == ["method", "budget", "cache", "passkey"]
    assert "query-aware" in scores.title
    data = json.loads(report.write_json(results, tmp_path / "eval.json").read_text())
    assert data["settings"]["lengths"] == [400] and len(data["records"]) == 8
    assert {row["method"] for row in data["summary"]} == {"full", "streamingllm"}
    assert report.summary(Results.from_dict(data)) == data["summary"]
    png = report.draw(results, tmp_path / "eval.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_teacher_forced_perplexity_through_the_full_plan_matches_one_forward(smollm):
    text = perplexity_sample(smollm.tokenizer, 48, continuation=4)
    plan = method_plan("full", smollm, None, 52, 1.0)
    through_cache = run_perplexity(smollm, plan, Sample(None, 48, text), 4).score
    tokens = torch.tensor([text.prefix_ids + text.continuation_ids])
    with torch.no_grad():
        logits = smollm.model(input_ids=tokens).logits[0, 47:51].float()
    nll = -torch.log_softmax(logits, -1).gather(1, tokens[0, 48:52, None]).squeeze(1)
    assert through_cache == pytest.approx(math.exp(float(nll.mean())), rel=1e-3)


def test_a_given_plan_must_serve_the_length_within_the_budget(smollm):
    plan = method_plan("streamingllm", smollm, None, 500, 0.25)
    assert given_plan(smollm, plan, 500, 0.25, "float32") is plan
    with pytest.raises(KvcError, match="--max-len"):
        given_plan(smollm, plan, 600, 0.25, "float32")
    with pytest.raises(KvcError, match="more than the budget"):
        given_plan(smollm, plan, 500, 0.1, "float32")


@pytest.mark.parametrize("arguments, message", [
    (["--tasks", "paskey"], "did you mean passkey"),
    (["--methods", "snapvk"], "did you mean snapkv"),
    (["--budgets", "0"], "outside (0, 1]"),
    (["--budgets", "1.5"], "outside (0, 1]"),
    (["--depths", "2"], "outside [0, 1]"),
    (["--lengths", ","], "at least one value"),
    (["--budgets", "half"], "not a number"),
    (["--budgets", "nan"], "--budgets: 'nan' is not a number"),
    (["--depths", "0.5,nan"], "--depths: 'nan' is not a number"),
    (["--lengths", "1e3"], "--lengths: '1e3' is not a number"),
    (["--json", "/nonexistent/r.json"], "--json /nonexistent/r.json: the folder /nonexistent does not exist"),
    (["--cache-dtype", "int4"], "--cache-dtype: unknown cache dtype"),
    (["--setting", "agnostic"], "--setting: unknown value 'agnostic' (expected query-aware, query-agnostic or both)"),
    (["--context-probe", "recon"], "--context-probe: unknown probe 'recon' (expected one of window, generic, reconstruct, expected, reconstruct+expected)"),
    (["--backend", "onnxruntime", "--tasks", "passkey", "--context-probe", "reconstruct"],
     "--context-probe reconstruct: the onnxruntime backend's graphs run no probe"),
])
def test_cli_refuses_bad_input_in_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--methods", "full", *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error



def test_recovery_task_through_the_harness(smollm):
    settings = Settings(tasks=["recovery"], methods=["full", "streamingllm"], budgets=[0.25], lengths=[120],
                        depths=[0.0], continuation=4)
    records = evaluate(smollm, settings, show_progress=False).records
    assert [(r.task, r.method) for r in records] == [("recovery", "full"), ("recovery", "streamingllm")]
    assert records[0].score == pytest.approx(1.0, abs=1e-5) and 0 < records[1].score < 1
    assert records[1].cache_bytes <= 0.25 * records[1].full_bytes and records[1].max_len == 124


def test_fidelity_summary_counts_the_loops_the_full_cache_does_not_have():
    settings = Settings(tasks=["fidelity"], methods=["full", "snapkv"], budgets=[0.25], lengths=[300],
                        depths=[0.5], setting=["query-agnostic"])
    full, plain, looping = list(range(20)), list(range(10)) + list(range(10, 20)), [1, 2, 3, 4] * 5
    records = [Record("fidelity", method, budget, 300, None, 1.0, 100, 400, 320, "", sample, "query-agnostic",
                      fidelity_metrics(tokens, full))
               for sample in (0, 1) for method, budget, tokens in
               (("full", 1.0, full), ("snapkv", 0.25, looping if sample else plain))]
    results = Results(settings, records, 1.0)
    rows = {row["method"]: row for row in report.summary(results)}
    assert rows["snapkv"]["fidelity_new_loop"] == 0.5 and rows["full"]["fidelity_new_loop"] == 0.0
    (scores,) = report.render(results).renderables
    assert [column.header for column in scores.table.columns][-1] == "new loops"
