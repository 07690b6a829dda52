"""The CLI's foundation commands and its error contract: one line, exit code 2, no traceback."""

import os
import subprocess
import sys

import pytest

from kvc.cli import main
from kvc.compiler.compile import DEFAULT_KV_BITS, DEFAULT_TARGET
from kvc.policies.schema import save_policy


def run(capsys, *args):
    with pytest.raises(SystemExit) as done:
        main(list(args))
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip().startswith("kvc 0.")


def test_models_lists_aliases_and_availability(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "smollm2-135m" in out and "llama-3-8b" in out and "qwen2.5-7b-instruct" in out
    assert "yes" in out and "no" in out


def test_show_and_validate_a_policy(capsys, policy, tmp_path):
    path = save_policy(policy, tmp_path / "policy.yaml")
    code, out, _ = run(capsys, "validate", str(path))
    assert code == 0 and "valid policy for tiny" in out
    png = tmp_path / "kinds.png"
    code, out, _ = run(capsys, "show", str(path), "--png", str(png))
    assert code == 0
    assert "special+punct" in out and "mean recovery" in out and "retrieval" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\x00\x01\x02garbage\xff", "not a text file"),
        (b"kvc_policy: 1\nmodel: [", "not valid YAML"),
        (b"kvc_policy: 1\n", "model: missing required key"),
    ],
)
def test_validate_errors_are_one_line_exit_2(capsys, tmp_path, content, message):
    path = tmp_path / "broken.yaml"
    path.write_bytes(content)
    code, out, err = run(capsys, "validate", str(path))
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_show_png_into_missing_folder_writes_nothing(capsys, policy, tmp_path):
    path = save_policy(policy, tmp_path / "policy.yaml")
    code, _, err = run(capsys, "show", str(path), "--png", str(tmp_path / "nope" / "k.png"))
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "nope").exists()


def test_missing_file_and_bad_option(capsys, tmp_path):
    code, _, err = run(capsys, "show", str(tmp_path / "absent.yaml"))
    assert code == 2 and "absent.yaml: no such policy or plan file" in err
    code, _, err = run(capsys, "models", "--bogus")
    assert code == 2 and err == "error: No such option: --bogus (see 'kvc models --help')\n"


@pytest.mark.parametrize("args, line", [
    (["eval", "--samples", "0"], "Invalid value for '--samples': Input should be greater than or equal to 1 (see "
                                 "'kvc eval --help')"),
    (["compile"], "Missing argument 'policy' (see 'kvc compile --help')"),
    (["gen", "--prompt", "x"], "No such command 'gen' (see 'kvc --help')"),
    (["serve", "--port", "abc"], "Invalid value for '--port': Input should be a valid integer, unable to parse string "
                                 "as an integer (see 'kvc serve --help')"),
])
def test_usage_errors_are_one_line_naming_the_help(capsys, args, line):
    """A mistyped command line gets the same one `error:` line as any other bad input, not a usage
    block and a framed panel."""
    code, out, err = run(capsys, *args)
    assert (code, out, err) == (2, "", f"error: {line}\n")


def test_kvc_alone_prints_the_help(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "Usage: kvc [OPTIONS] COMMAND" in out + err and "Compile a policy" in out + err


def test_console_script_without_and_with_debug(tmp_path):
    kvc = os.path.join(os.path.dirname(sys.executable), "kvc")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kvc_policy: 9\n")
    plain = subprocess.run([kvc, "validate", str(bad)], capture_output=True, text=True)
    assert plain.returncode == 2
    assert "kvc_policy: unsupported schema version 9" in plain.stderr and "Traceback" not in plain.stderr
    debug = subprocess.run([kvc, "--debug", "validate", str(bad)], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_loads_neither_torch_nor_transformers():
    """`kvc --help` answers at once: kvc's names load on first use, the CLI imports them inside its commands."""
    code = ("import sys\nfrom kvc.cli import main\ntry:\n    main(['compile', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted({'torch', 'transformers', 'triton'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Compile a policy" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-300:]


HEAVY = {"torch", "transformers"}


@pytest.mark.parametrize("args, message, unloaded", [
    (["generate", "--plan", "{plan}"], "give the prompt with exactly one of --prompt", HEAVY),
    (["generate", "--prompt", "hi", "--context-probe", "bogus"], "--context-probe: unknown probe 'bogus'", HEAVY),
    (["export", "--plan", "{plan}", "--out", "{file}"], "is a file; give a folder name", HEAVY),
    (["generate", "--plan", "{plan}", "--prompt", "hi"], "no such plan file", HEAVY),
    (["export", "--plan", "{plan}", "--out", "{folder}"], "no such plan file", HEAVY),
    (["generate", "--plan", "{file}", "--prompt", "hi"], "a-file: not a readable plan", {"transformers"}),
    (["serve", "--plan", "{plan}"], "no such plan file", HEAVY),
    (["show", "{plan}"], "no such policy or plan file", HEAVY),
    (["validate", "{file}"], "a-file: the policy file is empty", HEAVY),
    (["compile", "{file}"], "a-file: the policy file is empty", HEAVY),
    (["validate", "{folder}"], "no such policy or plan file", HEAVY),
    (["eval", "--tasks", "passkey,nosuch"], "--tasks: unknown name 'nosuch'", HEAVY),
    (["eval", "--methods", "kvc,snapkvv"], "unknown name 'snapkvv' (expected some of kvc, kvc-drop", HEAVY),
    (["eval", "--tasks", "ppl", "--backend", "onnxruntime"], "runs the tasks passkey, niah, not ppl", HEAVY),
    (["eval", "--policy", "{folder}.yaml"], "no such policy file", HEAVY),
    (["compile", "{folder}.yaml"], "no such policy file", HEAVY),
    (["profile", "--prompts", "{folder}.jsonl", "--out", "{folder}.yaml"], "no such prompt file", HEAVY),
    (["profile", "--threshold", "1.5", "--out", "{folder}.yaml"], "--threshold 1.5: must be in (0, 1]", HEAVY),
    (["generate", "smollm-135m", "--prompt", "hi"], "unknown model 'smollm-135m'; did you mean smollm2-135m", HEAVY),
    (["export", "llama-3-8b", "--plan", "{plan}", "--out", "{folder}"], "llama-3-8b: meta-llama/", HEAVY),
    (["profile", "no-such-model", "--out", "{folder}.yaml"], "unknown model 'no-such-model'", HEAVY),
    (["eval", "no-such-model", "--tasks", "passkey"], "unknown model 'no-such-model'", HEAVY),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_wrong_input_is_refused_before_the_libraries_it_does_not_need_load(tmp_path, args, message, unloaded):
    """What the command line alone shows wrong (an unknown model or one not downloaded included, a
    missing input file) is refused before torch (seconds) or transformers (seconds more) is imported;
    a plan file to read needs torch, still not transformers."""
    (tmp_path / "a-file").write_text("")
    values = {"plan": str(tmp_path / "missing.plan"), "file": str(tmp_path / "a-file"), "folder": str(tmp_path / "new")}
    argv = [arg.format(**values) for arg in args]
    code = (f"import sys\nfrom kvc.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as done:\n"
            f"    print(done.code, sorted(set({sorted(unloaded)!r}) & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "2 []", result.stdout


def test_a_policy_is_shown_without_torch(tmp_path, policy):
    """`kvc show` and `validate` read, check and render a policy torch-free (plans need torch: tensors)."""
    path = policy.save(tmp_path / "tiny.yaml")
    code = (f"import sys\nfrom kvc.cli import main\nfor command in ('show', 'validate'):\n    try:\n"
            f"        main([command, {str(path)!r}])\n    except SystemExit as done:\n        print('exit', done.code)\n"
            f"print(sorted({{'torch', 'transformers'}} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "tiny policy" in result.stdout and "valid policy for tiny" in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("exit 0") == 2 and result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-300:]


def test_every_name_kvc_exports_loads():
    import kvc
    import kvc.compiler
    import kvc.profiler

    for package in (kvc, kvc.compiler, kvc.profiler):
        assert all(getattr(package, name) is not None for name in package.__all__), package.__name__
    assert kvc.compile_policy is __import__("kvc.compiler", fromlist=["compile_policy"]).compile_policy
    with pytest.raises(AttributeError, match="no attribute 'compile'"):
        kvc.compile


def test_defaults_named_in_help_texts_are_the_code_defaults():
    """The help texts spell out defaults the CLI module does not import (start-up stays light)."""
    import typer

    from kvc.cli import app
    from kvc.compiler.retrieval import RETRIEVAL_THRESHOLD
    from kvc.eval.niah import ANSWER_TOKENS as NEEDLE
    from kvc.eval.passkey import ANSWER_TOKENS as PASSKEY

    commands = typer.main.get_command(app).commands
    helps = {param.name: param.help for name in ("compile", "eval") for param in commands[name].params}
    assert f"[default: {RETRIEVAL_THRESHOLD:g}]" in helps["retrieval_threshold"]
    assert f"{PASSKEY} for the passkey, {NEEDLE} for the needle" in helps["answer_tokens"]
    assert f"[default: {DEFAULT_KV_BITS}]" in helps["kv_bits"] and f"[default: {DEFAULT_TARGET:g}]" in helps["target"]


def test_help_shows_the_defaults_it_names(capsys):
    """Rich would take an unescaped "[default: ...]" for markup and print nothing."""
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    shown = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert f"[default: {DEFAULT_KV_BITS}]" in shown and "[default: the model's limit]" in shown


def test_help_lists_the_commands_in_the_order_of_the_workflow(capsys):
    workflow = ["profile", "compile", "generate", "eval", "export", "serve", "show", "validate", "models"]
    code, out, _ = run(capsys, "--help")
    rows = [line.replace("│", " ").split() for line in out.splitlines()]
    assert code == 0 and [row[0] for row in rows if row and row[0] in workflow] == workflow
    assert "Build: profile a model, compile a plan" in out and "Deploy: ONNX and vLLM" in out


@pytest.mark.parametrize("columns, width", [(None, 200), ("100", 100)])
def test_output_to_a_file_or_pipe_is_as_wide_as_its_tables_unless_columns_says(columns, width):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | ({"COLUMNS": columns} if columns else {})
    done = subprocess.run([sys.executable, "-c", "from kvc.cli import output_console; print(output_console().width)"],
                          capture_output=True, text=True, env=env, check=True)  # stdout a pipe, not a terminal
    assert int(done.stdout) == width
