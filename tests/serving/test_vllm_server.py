"""`kvc serve` as a user runs it: vLLM's OpenAI server with the plan, started once for this module,
answering HTTP completion requests as kvc's own runtime does; bad settings refused in one line."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvc.eval.passkey import passkey_correct, passkey_sample
from kvc.runtime.generate import generate

pytestmark = pytest.mark.vllm
SERVE = [sys.executable, "-m", "kvc.cli", "serve", "smollm2-135m"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_tmpdir():
    """The server's temporary folder (TMPDIR), short as a usual one (socket paths are limited to
    103 bytes): what the server leaves there is seen."""
    folder = Path(tempfile.mkdtemp(prefix="kvc-serve-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server(served_plan_file, server_tmpdir, tmp_path_factory):
    import httpx  # comes with vLLM (this module runs in its environment)

    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    environment = {key: value for key, value in os.environ.items() if key != "VLLM_RPC_BASE_PATH"}
    with open(log, "w") as output:
        process = subprocess.Popen([*SERVE, "--plan", str(served_plan_file), "--port", str(port), "--dtype", "float32",
                                    "--kv-cache-memory-bytes", str(64 << 20)], stdout=output, stderr=subprocess.STDOUT,
                                   env={**environment, "TMPDIR": str(server_tmpdir)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start in 15 minutes"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    # stopped as a user stops it: vLLM's socket files went with the folder kvc gave them
    assert process.returncode == 0, log.read_text()[-3000:]
    assert not [*server_tmpdir.glob("*.kvc-tmp"), *(path for path in server_tmpdir.rglob("*") if path.is_socket())]


def test_vllms_sockets_lie_in_a_folder_of_the_servers_own(server, server_tmpdir):
    """While it runs, the server's temporary folder holds one kvc temporary folder (removed when the
    server stops: see the fixture) with vLLM's socket files in it, and no socket beside it. (vLLM's
    other leftovers there, a `vllm_dist_*` file and torch's compile cache, stay as vLLM leaves them.)"""
    (folder,) = server_tmpdir.glob("*.kvc-tmp")
    assert re.fullmatch(r"\.vllm\.\d+-[0-9a-f]+\.kvc-tmp", folder.name)
    assert any(entry.is_socket() for entry in folder.iterdir())
    assert not any(entry.is_socket() for entry in server_tmpdir.iterdir())


def complete(url: str, prompt: str, tokens: int) -> str:
    import httpx

    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    reply = httpx.post(f"{url}/v1/completions", timeout=600,
                       json={"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_the_server_answers_a_passkey_as_kvcs_runtime_does(server, smollm, served_plan):
    sample = passkey_sample(smollm.tokenizer, 1000, 0.9, seed=2)  # the demo's third passkey
    answer = complete(server, sample.text, 8)
    assert answer == generate(smollm, sample.text, plan=served_plan, max_new_tokens=8).texts[0]
    assert passkey_correct(sample, answer), answer


def test_prompts_sent_at_once_are_answered_as_kvcs_runtime_does(server, smollm, served_plan):
    """Three prompts at once, more tokens together than one step's budget (the plan's max length):
    batched with each other, each answers as kvc's runtime does on its own."""
    samples = [passkey_sample(smollm.tokenizer, length, depth, seed=30 + i)
               for i, (length, depth) in enumerate(((600, 0.3), (750, 0.6), (900, 0.8)))]
    with ThreadPoolExecutor(len(samples)) as pool:
        answers = list(pool.map(lambda sample: complete(server, sample.text, 8), samples))
    own = [generate(smollm, sample.text, plan=served_plan, max_new_tokens=8).texts[0] for sample in samples]
    assert answers == own
    assert all(passkey_correct(sample, answer) for sample, answer in zip(samples, answers)), answers


def refusal(args) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=600)


def test_a_plan_of_another_model_is_one_line(policy_factory, tmp_path):
    from kvc.compiler import compile_policy

    plan = tmp_path / "tiny.plan"
    compile_policy(policy_factory(), 0.5, max_len=256, strategy="knapsack").save(plan)
    result = refusal(["--plan", str(plan)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: this plan was compiled for tiny")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("options, message", [
    (["--max-model-len", "2048"], "error: the engine serves sequences of up to 2048 tokens"),
    (["--enable-prefix-caching"], "error: kvc does not support prefix caching"),
    (["--kv-cache-dtype", "fp8"], "error: --kv-cache-dtype fp8: the plan stores its cache as bfloat16"),
])
def test_settings_the_plan_cannot_serve_are_one_line(served_plan_file, options, message):
    result = refusal(["--plan", str(served_plan_file), *options])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
