"""Generation end to end: a hand-built plan of small special/punct/frequency/local heads stays coherent
at a fifth of the full cache, and `kvc generate` prints text and bytes, with or without a plan (and
with `--compile`, the eager run's text), and turns bad plans, prompts and options into one-line
errors with exit code 2."""

import math

import pytest
import torch

from kvc.cli import main
from kvc.runtime.generate import encode_prompts, generate
from kvc.runtime.handmade import handmade_plan

STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens, and wrote the weather in a leather logbook: wind from the west, "
    "rain by midnight, ships sighted near the northern reef. In winter the storms were fierce; "
    "waves broke over the rocks and salt crusted the windows. Still, the light never failed. "
    "Sailors along the coast told stories about him, and children in the village waved when "
    "he walked to the market on Saturdays. One morning a letter arrived from the capital. "
)
PROMPT = STORY * 2 + "\nSummarize the story above in one sentence."


@pytest.fixture(scope="module")
def small_plan(smollm):
    return handmade_plan(smollm.model.config, smollm.tokenizer, "special+punct+frequency+local", 512,
                         class_slots=32, heavy=32, window=32)


def perplexity_of(smollm, prompt_ids, text):
    """Perplexity of a continuation under the full model: low for fluent, on-topic text."""
    continuation = smollm.tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = smollm.model(torch.tensor([prompt_ids + continuation])).logits[0, len(prompt_ids) - 1:-1]
    log_probs = logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None])
    return math.exp(-float(log_probs.mean()))


def test_small_heads_generate_coherently_with_far_fewer_bytes(smollm, small_plan):
    full = generate(smollm, PROMPT, None, max_new_tokens=20, chat=True)
    compressed = generate(smollm, PROMPT, small_plan, max_new_tokens=20, chat=True)
    assert small_plan.compression < 0.25
    assert compressed.cache_bytes == small_plan.cache_bytes
    assert compressed.cache_bytes < 0.4 * full.cache_bytes  # even against the 300 tokens actually cached
    prompt_ids = encode_prompts(smollm.tokenizer, [PROMPT], chat=True)[0]
    assert "lighthouse" in compressed.texts[0].lower()
    assert perplexity_of(smollm, prompt_ids, compressed.texts[0]) < 20  # word salad scores in the thousands
    assert "compressed" in compressed.summary() and "full cache" in full.summary()


def test_batched_prompts_of_different_lengths(smollm, small_plan):
    small_plan_for_two = handmade_plan(smollm.model.config, smollm.tokenizer, "special+punct+frequency+local",
                                       512, class_slots=32, heavy=32, window=32, batch=2)
    result = generate(smollm, [PROMPT, "What is the capital of France?"], small_plan_for_two,
                      max_new_tokens=8, chat=True)
    assert len(result.texts) == 2 and "Paris" in result.texts[1]
    assert result.cache_bytes == small_plan_for_two.cache_bytes


def run(capsys, *args):
    with pytest.raises(SystemExit) as done:
        main(list(args))
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.fixture
def cli(monkeypatch, smollm, capsys):
    """`kvc ...` in process, with the session's model instead of a fresh load."""
    monkeypatch.setattr("kvc.models.load", lambda *args, **kwargs: smollm)
    return lambda *args: run(capsys, *args)


def test_cli_generate_with_and_without_a_plan(cli, small_plan, tmp_path):
    plan_path = small_plan.save(tmp_path / "small.plan")
    prompt_path = tmp_path / "prompt.txt"
    prompt_path.write_text("The capital of France is")
    code, out, _ = cli("generate", "--prompt-file", str(prompt_path), "--max-new-tokens", "6")
    assert code == 0 and "Paris" in out and "(full cache)" in out
    code, out, _ = cli("generate", "--plan", str(plan_path), "--prompt", "The capital of France is",
                       "--max-new-tokens", "6")
    assert code == 0 and "Paris" in out and "compressed (static plan, 19.9% of a full cache at 512 tokens)" in out


@pytest.mark.parametrize("arguments, message", [
    ((), "exactly one of --prompt TEXT and --prompt-file FILE"),
    (("--prompt", "a", "--prompt-file", "b.txt"), "exactly one of"),
    (("--prompt-file", "missing.txt"), "missing.txt: cannot read the prompt file"),
    (("--prompt", "  "), "the prompt is empty"),
    (("--prompt", "hello", "--plan", "missing.plan"), "missing.plan: no such plan file"),
])
def test_cli_prompt_and_plan_errors(cli, arguments, message):
    code, _, err = cli("generate", *arguments)
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_plans_that_do_not_fit(cli, smollm, tmp_path):
    other = handmade_plan(smollm.model.config, smollm.tokenizer, "full", 512)
    other.fingerprint, other.model_name = "sha256:0000000000000000", "another-model"
    short = handmade_plan(smollm.model.config, smollm.tokenizer, "full", 8)
    code, _, err = cli("generate", "--plan", str(other.save(tmp_path / "other.plan")), "--prompt", "hello")
    assert code == 2 and "compiled for another-model" in err
    code, _, err = cli("generate", "--plan", str(short.save(tmp_path / "short.plan")), "--prompt", PROMPT)
    assert code == 2 and "--max-len 8" in err and "recompile with `kvc compile POLICY --max-len" in err


def test_unreadable_prompt_file(cli, tmp_path):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = cli("generate", "--prompt-file", str(binary))
    assert code == 2 and "cannot read the prompt file" in err


def test_cli_generate_compiled_decodes_the_eager_tokens(capsys, tiny_model_dir, tmp_path):
    """`kvc generate --plan P --compile` on a model folder (a tiny random Llama, loaded as a user's
    would be): the eager run's text, and the line says the step was compiled."""
    from kvc.models import load

    tiny = load(str(tiny_model_dir), dtype="float32", device="cpu")
    plan = handmade_plan(tiny.model.config, tiny.tokenizer, "special+punct+frequency+local", 64,
                         class_slots=4, heavy=4, window=4).save(tmp_path / "tiny.plan")
    command = ("generate", str(tiny_model_dir), "--plan", str(plan), "--prompt", "A short prompt, with commas.",
               "--max-new-tokens", "6")
    code, eager, _ = run(capsys, *command)
    torch._dynamo.reset()
    compiled_code, compiled, _ = run(capsys, *command, "--compile")
    assert code == compiled_code == 0
    assert compiled.split("kv cache:")[0] == eager.split("kv cache:")[0] and eager.split("kv cache:")[0].strip()
    assert "compressed (static plan" in compiled and "(compiled; the first step took" in compiled
    assert "compiled" not in eager


@pytest.mark.parametrize("arguments, message", [
    (("--prompt", "hello", "--compile"), "--compile decodes through a plan's compressed step: give --plan"),
    (("--prompt", "a\n---\nb", "--chat", "--compile"), "give --plan"),
    (("--prompt", "hello", "--compile", "--onnx", "folder"), "the onnxruntime graphs run as exported"),
])
def test_cli_compile_errors(cli, arguments, message):
    code, _, err = cli("generate", *arguments)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
