"""`kvc compile` and `kvc show PLAN` from the command line: outputs, and one-line errors that write nothing."""

import dataclasses
import json

import pytest

from kvc.cli import main
from kvc.plan import Plan


def run(*args) -> int:
    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def test_compile_writes_the_plan_and_the_report(tmp_path, policy_file, capsys):
    plan_path, report_path = tmp_path / "out.plan", tmp_path / "report.json"
    code = run("compile", str(policy_file), "--target", "0.2", "--max-len", "2048", "--batch", "4",
               "--dtype", "fp16", "--out", str(plan_path), "--json", str(report_path))
    printed = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert code == 0
    plan = Plan.load(plan_path)
    report = json.loads(report_path.read_text())
    assert (plan.target.max_len, plan.target.batch, plan.target.dtype) == (2048, 4, "float16")
    assert report["cache_bytes"] == plan.cache_bytes <= report["target"]["budget_bytes"]
    assert report["fraction_of_full"] == pytest.approx(plan.compression, abs=1e-6)
    assert report["compression_ratio"] == pytest.approx(1 / plan.compression, rel=1e-4)
    assert len(report["layers"]) == plan.num_layers
    assert sum(layer["bytes"] for layer in report["layers"]) + report["overhead_bytes"] == plan.cache_bytes
    assert report["expected_recovery"] == pytest.approx(float(plan.expected_recovery.mean()), abs=1e-6)
    # what one sequence holds at any length, and the shortest full cache (fp16) that holds as much
    assert report["sequence_bytes"] == plan.cache_bytes_at(1) - plan.table_bytes
    full_per_token = plan.num_layers * plan.num_kv_heads * plan.head_dim * 2 * 2
    tokens = report["break_even_tokens"]
    assert (tokens - 1) * full_per_token < report["sequence_bytes"] <= tokens * full_per_token
    assert tokens == pytest.approx(0.2 * 2048, rel=0.02)
    line = f"as much as a full cache of {tokens:,} tokens: shorter sequences take less memory uncompressed"
    assert printed.count(line) == 1
    assert run("show", str(plan_path)) == 0
    assert line in " ".join(capsys.readouterr().out.split())
    assert "retrieval plan" in printed and "expected recovery" in printed and f"wrote {plan_path}" in printed
    chosen = report["notes"]["retrieval"]["heads"]
    assert chosen and f"retrieval: {len(chosen)} KV heads" in printed


def test_the_paths_written_are_printed_whole_however_long(tmp_path, policy_file, capsys):
    """A path longer than the console is wide (80 columns in a narrow terminal, 200 in a pipe) is
    printed on one line, not folded into pieces a user cannot paste back."""
    folder = tmp_path / ("long-folder-name-" * 12)
    folder.mkdir()
    plan_path, report_path = folder / "out.plan", folder / "report.json"
    assert len(str(plan_path)) > 200
    code = run("compile", str(policy_file), "--target", "0.2", "--out", str(plan_path), "--json", str(report_path))
    assert code == 0
    assert f"wrote {plan_path} and {report_path}\n" in capsys.readouterr().out


def test_paths_and_names_with_brackets_are_printed_as_written(tmp_path, small_policy, capsys):
    """rich reads `[bold]` or `[v2]` as markup: a path or a model name holding one would lose it in what
    kvc prints (or, with a stray closing tag, fail after the file was written)."""
    folder = tmp_path / "runs[v2]"
    folder.mkdir()
    named = dataclasses.replace(small_policy, model=dataclasses.replace(small_policy.model, name="tuned[bold]model"))
    policy_path, plan_path, png = named.save(folder / "p[red].yaml"), folder / "out[bold].plan", folder / "plan[i].png"
    assert run("compile", str(policy_path), "--out", str(plan_path)) == 0
    assert f"wrote {plan_path}\n" in capsys.readouterr().out
    assert run("validate", str(plan_path)) == 0
    assert f"ok: {plan_path} is a valid plan for tuned[bold]model\n" in capsys.readouterr().out
    assert run("show", str(plan_path), "--png", str(png)) == 0
    printed = capsys.readouterr().out
    assert "tuned[bold]model plan · " in printed and f"wrote {png}\n" in printed
    assert run("show", str(policy_path)) == 0
    assert "tuned[bold]model policy · " in capsys.readouterr().out


def test_compile_low_bit_rows(tmp_path, policy_file, capsys):
    plan_path, report_path = tmp_path / "low.plan", tmp_path / "low.json"
    assert run("compile", str(policy_file), "--kv-bits", "4", "--out", str(plan_path), "--json", str(report_path)) == 0
    assert "K/V 4-bit" in " ".join(capsys.readouterr().out.split())
    assert Plan.load(plan_path).kv_bits == json.loads(report_path.read_text())["kv_bits"] == 4


def test_compile_for_tensor_parallel_ranks(tmp_path, policy_file, capsys):
    plan_path, report_path = tmp_path / "tp.plan", tmp_path / "tp.json"
    assert run("compile", str(policy_file), "--tensor-parallel-size", "2", "--out", str(plan_path),
               "--json", str(report_path)) == 0
    printed = " ".join(capsys.readouterr().out.split())
    report = json.loads(report_path.read_text())
    assert Plan.load(plan_path).tensor_parallel_size == report["tensor_parallel"]["ranks"] == 2
    low, high = min(report["tensor_parallel"]["rank_bytes"]), max(report["tensor_parallel"]["rank_bytes"])
    assert "2 tensor-parallel ranks · " in printed and "compiled for 2 tensor-parallel ranks, each with its share of " \
        "the budget over its KV heads: " in printed and high - low < 0.01 * high


def test_compile_merges_evicted_tokens_at_tight_budgets_or_when_asked(tmp_path, policy_file, capsys):
    assert run("compile", str(policy_file), "--out", str(tmp_path / "a.plan")) == 0  # 25%: dropped
    assert "merged" not in capsys.readouterr().out
    assert Plan.load(tmp_path / "a.plan").merge_similarity is None
    assert run("compile", str(policy_file), "--merge-similarity", "0.5", "--out", str(tmp_path / "b.plan")) == 0
    printed = " ".join(capsys.readouterr().out.split())
    plan = Plan.load(tmp_path / "b.plan")
    assert plan.merge_similarity == 0.5
    heads = int(plan.has("frequency").sum())
    assert heads and ("evicted prompt tokens merged into the heavy hitter with the most similar key (cosine ≥ 0.5; in "
                      "a context prefilled before its questions, into any kept token but the sinks) "
                      f"in {heads} SnapKV-style heads (--merge-similarity off drops them)") in printed
    assert run("compile", str(policy_file), "--merge-similarity", "-1", "--out", str(tmp_path / "c.plan")) == 0
    assert Plan.load(tmp_path / "c.plan").merge_similarity == -1
    assert run("compile", str(policy_file), "--target", "0.1", "--out", str(tmp_path / "d.plan")) == 0
    assert "evicted prompt tokens merged" in " ".join(capsys.readouterr().out.split())
    assert Plan.load(tmp_path / "d.plan").merge_similarity == 0.5
    assert run("compile", str(policy_file), "--target", "0.1", "--merge-similarity", "off",
               "--out", str(tmp_path / "e.plan")) == 0
    assert "merged" not in capsys.readouterr().out
    assert Plan.load(tmp_path / "e.plan").merge_similarity is None


def test_compile_defaults_the_plan_name_from_the_policy(policy_file):
    assert run("compile", str(policy_file), "--memory", "1MiB", "--strategy", "uniform") == 0
    plan = Plan.load(policy_file.with_suffix(".plan"))
    assert plan.strategy == "uniform" and plan.target.budget_bytes == 2**20


@pytest.mark.parametrize("strategy", ["fastgen", "pyramid"])
def test_show_renders_and_draws_a_compiled_plan(tmp_path, policy_file, capsys, strategy):
    plan_path, png = tmp_path / "plan.kvc", tmp_path / "plan.png"
    assert run("compile", str(policy_file), "--strategy", strategy, "--out", str(plan_path)) == 0
    capsys.readouterr()
    assert run("show", str(plan_path), "--png", str(png)) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"strategy {strategy}" in printed and "% of full" in printed and "expected recovery" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--target", "0.00001"], "below the smallest plan the retrieval strategy can make"),
    (["--memory", "2XB"], "'2XB' is not a size"),
    (["--memory", "-3GiB"], "must be positive"),
    (["--memory", "0"], "must be positive"),
    (["--target", "0"], "share of the full cache"),
    (["--max-len", "999999"], "above synthetic-6x2's limit of 4096 positions"),
    (["--batch", "-1"], "positive number of sequences"),
    (["--strategy", "snapkv"], "unknown strategy"),
    (["--strategy", "knapsack", "--retrieval-threshold", "0.1"], "applies to the retrieval strategy"),
    (["--retrieval-threshold", "2"], "outside [0, 1]"),
    (["--kv-bits", "3"], "--kv-bits: expected one of 2, 4, 8"),
    (["--merge-similarity", "1.5"], "--merge-similarity: 1.5 is outside [-1.0, 1.0]"),
    (["--target", "0.1", "--memory", "1GiB"], "not both"),
    (["--tensor-parallel-size", "4"], "--tensor-parallel-size 4 does not divide the model's 2 KV heads"),
    (["--json", "/no/such/folder/report.json"], "does not exist"),
])
def test_bad_requests_exit_2_with_one_line_and_write_nothing(tmp_path, policy_file, capsys, args, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run("compile", str(policy_file), "--out", str(tmp_path / "x.plan"), *args)
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert message in " ".join(error.split()) and len(error.splitlines()) <= 3  # one line, wrapped at most by the terminal
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_broken_policy_file_exits_2_and_names_the_path(tmp_path, policy_file, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text(policy_file.read_text().replace("head_dim: 16", "head_dim: -16", 1))
    assert run("compile", str(broken), "--out", str(tmp_path / "x.plan")) == 2
    assert "model.head_dim: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x.plan").exists()


def test_compile_refuses_to_overwrite_the_policy(policy_file, capsys):
    text = policy_file.read_text()
    assert run("compile", str(policy_file), "--out", str(policy_file)) == 2
    assert "that is the policy file" in capsys.readouterr().err
    assert policy_file.read_text() == text
