"""`kvc eval` as the user runs it, on a tiny model folder: records saved as the run goes, an interrupted
run resumed by the same command, and the demo's cached policy used when --policy is not given."""

import io
import json
import signal

import pytest
import torch

from dataclasses import replace

from kvc.cli import main
from kvc.eval.records import Record, Results
from kvc.eval.progress import Progress, run_identity
from kvc.eval.settings import Settings


def run(capsys, *args):
    with pytest.raises(SystemExit) as done:
        main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_an_interrupted_run_keeps_its_records_and_the_same_command_resumes(tiny_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    command = [tiny_model_dir, "--tasks", "ppl", "--methods", "full", "--lengths", "48", "--samples", "2",
               "--device", "cpu", "--json", tmp_path / "r.json"]
    save = Progress.save

    def save_then_sigterm(self, results, complete=False):
        save(self, results, complete)
        signal.raise_signal(signal.SIGTERM)  # as `kill` would, right after the first record is on disk

    monkeypatch.setattr(Progress, "save", save_then_sigterm)
    code, _, err = run(capsys, *command)
    assert code == 2
    assert err.strip() == (f"error: interrupted; the results so far are in {tmp_path / 'r.json'}; the same "
                           "command resumes the run")
    partial = json.loads((tmp_path / "r.json").read_text())
    assert partial["complete"] is False and len(partial["records"]) == 1
    assert partial["seconds"] > 0  # the time spent so far, for the resumed run to add to
    partial["records"][0]["completion"] = "kept from the first run"
    partial["seconds"] = 1000.0  # as if the first record had taken that long
    (tmp_path / "r.json").write_text(json.dumps(partial))

    monkeypatch.setattr(Progress, "save", save)
    code, out, _ = run(capsys, *command)
    assert code == 0 and "resuming: 1 record of an earlier run" in out
    final = json.loads((tmp_path / "r.json").read_text())
    assert final["complete"] is True and [record["sample"] for record in final["records"]] == [0, 1]
    assert final["records"][0]["completion"] == "kept from the first run"
    assert 1000.0 < final["seconds"] < 1060.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]

    code, out, _ = run(capsys, *command)  # nothing left to compute: the seconds stay the run's
    assert code == 0 and "resuming: 2 records of an earlier run" in out
    assert json.loads((tmp_path / "r.json").read_text())["seconds"] == final["seconds"]

    final["run"]["threads"] += 1  # as if written with another OMP_NUM_THREADS
    (tmp_path / "r.json").write_text(earlier := json.dumps(final))
    code, out, err = run(capsys, *command)
    threads = torch.get_num_threads()
    assert code == 2 and "resuming" not in out
    assert err.strip() == (f"error: --json {tmp_path / 'r.json'} holds the records of another run (threads "
                           f"{threads + 1}, now {threads}); run that one's command to resume it, or give another "
                           "--json (or remove the file) to start afresh")
    assert (tmp_path / "r.json").read_text() == earlier  # its records kept, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_resumed_run_stopped_early_keeps_every_earlier_record_on_disk(tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    path = tmp_path / "r.json"
    command = [tiny_model_dir, "--tasks", "ppl", "--lengths", "48", "--device", "cpu", "--json", path]
    cells = lambda: sorted((r["method"], r["sample"]) for r in json.loads(path.read_text())["records"])  # noqa: E731
    assert run(capsys, *command, "--methods", "full", "--samples", "2")[0] == 0
    assert cells() == [("full", 0), ("full", 1)]
    save = Progress.save

    def save_then_sigterm(self, results, complete=False):
        save(self, results, complete)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(Progress, "save", save_then_sigterm)  # stopped at its first new record, before it reaches full
    code, out, err = run(capsys, *command, "--methods", "streamingllm,full", "--budgets", "0.5", "--samples", "2")
    assert code == 2 and "resuming: 2 records" in out and err.startswith("error: interrupted;")
    assert cells() == [("full", 0), ("full", 1), ("streamingllm", 0)]
    monkeypatch.setattr(Progress, "save", save)
    code, out, _ = run(capsys, *command, "--methods", "full", "--samples", "1")  # asks for fewer: the rest stays
    assert code == 0 and "resuming: 3 records" in out
    assert cells() == [("full", 0), ("full", 1), ("streamingllm", 0)] and json.loads(path.read_text())["complete"]


def test_records_of_a_run_with_another_context_probe_or_backend_are_not_reused(tmp_path):
    """A record's cell does not name the probe that scored the context nor the backend that ran it:
    the run's identity does, so a --json file of another probe is not resumed: no mixing."""
    settings = Settings(tasks=["passkey"], methods=["kvc"], budgets=[0.25], lengths=[64], depths=[0.5],
                        setting=["query-agnostic"], context_probe="reconstruct")
    record = Record("passkey", "kvc", 0.25, 64, 0.5, 1.0, 10, 40, 80, "12345", 0, "query-agnostic")
    Progress(tmp_path / "r.json", run_identity("m", settings, None, None), temporary=False).save(
        Results(settings, [record]))
    for other, reused in ((settings, 1), (replace(settings, context_probe="reconstruct+expected"), 0),
                          (replace(settings, backend="onnxruntime"), 0)):
        progress = Progress(tmp_path / "r.json", run_identity("m", other, None, None), temporary=False)
        assert len(progress.earlier()[0]) == reused


def test_records_written_with_another_thread_count_are_not_reused(tmp_path):
    """The CPU thread count orders the sums, which decide near-ties of greedy answers: a file written
    with another count is not resumed, and the file names the count it was written with."""
    settings = Settings(tasks=["passkey"], methods=["kvc"], budgets=[0.25], lengths=[64], depths=[0.5],
                        setting=["query-aware"])
    record = Record("passkey", "kvc", 0.25, 64, 0.5, 1.0, 10, 40, 80, "12345", 0, "query-aware")
    threads = torch.get_num_threads()
    Progress(tmp_path / "r.json", run_identity("m", settings, None, None), temporary=False).save(
        Results(settings, [record]))
    assert json.loads((tmp_path / "r.json").read_text())["run"]["threads"] == threads
    assert len(Progress(tmp_path / "r.json", run_identity("m", settings, None, None), temporary=False).earlier()[0]) == 1
    torch.set_num_threads(threads + 1)
    try:
        other = run_identity("m", settings, None, None)
    finally:
        torch.set_num_threads(threads)
    assert other["threads"] == threads + 1
    assert Progress(tmp_path / "r.json", other, temporary=False).earlier()[0] == {}


def test_without_a_policy_the_demo_policy_is_used_and_named(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The demo's cached policy of the model stands in for --policy (profiled here on the built-in prompts
    cut to 128 tokens, to stay fast), and the result file names it relative to here."""
    from kvc.demo import cached_policy_path
    from kvc.models import load
    from kvc.profiler import load_prompts, profile_model

    monkeypatch.setenv("KVC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    loaded = load(str(tiny_model_dir), device="cpu")
    profile_model(loaded, load_prompts("builtin"), max_tokens=128).save(cached_policy_path(loaded))
    command = [tiny_model_dir, "--tasks", "ppl", "--methods", "snapkv", "--lengths", "48", "--budgets", "0.5",
               "--device", "cpu", "--json", "r.json"]  # (at 25% the cache's tables would take most of the budget)
    code, out, err = run(capsys, *command)
    assert code == 0 and "no --policy given" in out and "reusing the policy profiled earlier" in out, err
    recorded = json.loads((tmp_path / "r.json").read_text())["settings"]["policy"]
    assert recorded.startswith("cache/policies/") and (tmp_path / recorded).is_file()
    code, out, _ = run(capsys, *command[:-2])  # without --json the records go to the cache, until complete
    assert code == 0 and list((tmp_path / "cache" / "eval").iterdir()) == []


def test_a_cached_policy_without_probe_curves_is_profiled_again(tiny_model_dir, tmp_path, monkeypatch):
    """A policy an older kvc cached (no context probe) would compile equal budgets: the demo profiles again, and
    the run that profiles uses the policy as later runs read it, so `kvc eval` resumes across the two."""
    from rich.console import Console

    from kvc.demo import cached_policy, cached_policy_path
    from kvc.models import load
    from kvc.policies.schema import dump_policy, load_policy
    from kvc.profiler import load_prompts, profile_model

    monkeypatch.setenv("KVC_CACHE", str(tmp_path / "cache"))
    loaded = load(str(tiny_model_dir), device="cpu")
    older = profile_model(loaded, load_prompts("builtin"), max_tokens=64)
    older.profile.context_probe_scheme = ""
    for layer in older.layers:
        for head in layer.heads:
            head.probe_curve = None
    path = older.save(cached_policy_path(loaded))
    policy = cached_policy(loaded, Console(file=io.StringIO()))
    assert policy.profile.context_probe_scheme and all(head.probe_curve for layer in policy.layers for head in layer.heads)
    assert load_policy(path).to_dict() == policy.to_dict()  # and the cache holds the new one
    again = cached_policy(loaded, Console(file=io.StringIO()))  # a later run reads it from the cache
    assert dump_policy(again) == dump_policy(policy)  # the text a run's identity hashes: a profiling run resumes
