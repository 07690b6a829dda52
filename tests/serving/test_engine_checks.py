"""What a plan cannot serve is refused before vLLM is imported (this module runs where vLLM is not
installed): `kvc serve` and `llm()` answer a wrong setting in a second, not after vLLM's start."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvc.policies.errors import KvcError
from kvc.serving.vllm.engine import RPC_ENV, SOCKET_PATH_MAX, engine_settings, served_folder
from kvc.serving.vllm.plans import PLAN_ENV


@pytest.mark.parametrize("engine_args, message", [
    ({"max_model_len": 2048}, "the engine serves sequences of up to 2048 tokens but the plan was compiled for "
                              "--max-len 1040; pass --max-model-len 1040"),
    ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8: the plan stores its cache as bfloat16"),
    ({"tensor_parallel_size": 2}, "--tensor-parallel-size 2 does not divide the plan's 3 KV heads"),
])
def test_settings_the_plan_cannot_serve_are_refused_before_vllm_starts(served_plan_file, monkeypatch, engine_args,
                                                                      message):
    monkeypatch.setenv(PLAN_ENV, "")
    with pytest.raises(KvcError) as refused:
        engine_settings(None, served_plan_file, engine_args)
    assert str(refused.value).startswith(message)
    with pytest.raises(KvcError) as refused:  # before the model too: an unknown one is not even looked up
        engine_settings("no-such-model", served_plan_file, engine_args)
    assert str(refused.value).startswith(message)


def test_what_a_kvc_cache_cannot_do_is_refused_before_vllm_starts(served_plan_file, monkeypatch):
    """Speculative decoding would leave the drafts the model rejects in the cache (its tokens are
    admitted, and evict others, as they are attended); prefix caching would share pages that hold
    one sequence's keep-sets."""
    monkeypatch.setenv(PLAN_ENV, "")
    cases = [({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
              "kvc does not support speculative decoding: a kvc cache admits every token it attends"),
             ({"enable_prefix_caching": True}, "kvc does not support prefix caching")]
    for engine_args, message in cases:
        with pytest.raises(KvcError) as refused:
            engine_settings(None, served_plan_file, engine_args)
        assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_plan_of_another_model_is_refused_before_vllm_starts(policy_factory, tmp_path, monkeypatch):
    from kvc.compiler import compile_policy

    monkeypatch.setenv(PLAN_ENV, "")
    plan = compile_policy(policy_factory(), 0.5, max_len=256, strategy="knapsack")
    with pytest.raises(KvcError, match="this plan was compiled for tiny"):
        engine_settings(None, plan, {})


@pytest.mark.parametrize("options, line", [
    (["--kv-cache-dtype=fp8"], "--kv-cache-dtype fp8: the plan stores its cache as bfloat16; leave --kv-cache-dtype "
                               "at auto or recompile with `kvc compile POLICY --dtype ...`"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 does not divide the plan's 3 KV heads"),
    (["-tp=2"], "--tensor-parallel-size 2 does not divide the plan's 3 KV heads"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'],
     "kvc does not support speculative decoding: a kvc cache admits every token it attends (evicting for it), so "
     "it cannot take back the draft tokens the model rejects; leave --speculative-config off"),
])
def test_kvc_serve_refuses_in_one_line_without_vllm(served_plan_file, options, line):
    result = subprocess.run([sys.executable, "-m", "kvc.cli", "serve", "--plan", str(served_plan_file), *options],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {line}"], result.stderr


def run_python(script: str, **environment) -> str:
    inherited = {key: value for key, value in os.environ.items() if key != RPC_ENV}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**inherited, **environment})
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def short_tmp():
    """A temporary folder with a short path, as TMPDIR usually is (pytest's are too long for sockets)."""
    folder = Path(tempfile.mkdtemp(prefix="kvc-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_vllms_sockets_go_in_a_folder_of_the_process_removed_at_exit(short_tmp):
    """vLLM leaves its socket files in the temporary folder; a kvc engine's process points them at a
    folder of its own, gone when the process ends, and one a killed process left goes at the next start."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = short_tmp / f".vllm.{gone.pid}-0123abcd.kvc-tmp"
    stale.mkdir()
    (stale / "socket").touch()
    printed = run_python("import os; from kvc.serving.vllm.engine import RPC_ENV, private_rpc_folder; "
                         "folder = private_rpc_folder(); (folder / 'socket').touch(); "
                         "print(folder, os.environ[RPC_ENV], os.listdir(folder), private_rpc_folder())",
                         TMPDIR=str(short_tmp))
    folder, named, listed, again = printed.split()
    assert re.fullmatch(rf"{re.escape(str(short_tmp))}/\.vllm\.\d+-[0-9a-f]+\.kvc-tmp", folder)
    assert (named, listed, again) == (folder, "['socket']", "None")  # one folder a process
    assert list(short_tmp.iterdir()) == []  # this process's folder removed at exit, the stale one before


def test_no_socket_folder_where_the_sockets_paths_would_be_too_long(tmp_path):
    """A socket's path has at most 103 bytes (macOS; 107 on Linux): under a long TMPDIR the sockets
    stay where vLLM puts them rather than fail to bind."""
    deep = tmp_path / ("d" * (SOCKET_PATH_MAX - len(str(tmp_path))))
    deep.mkdir()
    printed = run_python("import os; from kvc.serving.vllm.engine import RPC_ENV, private_rpc_folder; "
                         "print(private_rpc_folder(), RPC_ENV in os.environ)", TMPDIR=str(deep))
    assert printed.split() == ["None", "False"] and list(deep.iterdir()) == []


def test_a_socket_folder_the_user_chose_is_kept(tmp_path):
    chosen = tmp_path / "sockets"
    chosen.mkdir()
    printed = run_python("import os; from kvc.serving.vllm.engine import RPC_ENV, private_rpc_folder; "
                         "print(private_rpc_folder(), os.environ[RPC_ENV])", TMPDIR=str(tmp_path),
                         **{RPC_ENV: str(chosen)})
    assert printed.split() == ["None", str(chosen)]
    assert list(tmp_path.iterdir()) == [chosen]


def test_the_served_copy_of_a_folder_without_architectures_is_made_once(tmp_path, monkeypatch):
    """A folder whose config names no architecture is served from a copy that does; a later serve
    finds that copy without importing transformers' model table (seconds), a changed config remakes it."""
    monkeypatch.setenv("KVC_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    folder.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": 2, "vocab_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"weights")
    served = served_folder(str(folder))
    assert json.loads((served / "config.json").read_text()) == {**config, "architectures": ["LlamaForCausalLM"]}
    assert (served / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    with monkeypatch.context() as no_table:
        no_table.setitem(sys.modules, "transformers.models.auto.modeling_auto", None)  # importing it now fails
        assert served_folder(str(folder)) == served
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 128}))
        with pytest.raises(ImportError):
            served_folder(str(folder))
    assert json.loads((served_folder(str(folder)) / "config.json").read_text())["vocab_size"] == 128
