"""Resolving and loading models: the embedded GGUF, local folders, and one clear error per mistake."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvc import models
from kvc.policies.errors import KvcError


def test_default_model_is_the_embedded_gguf():
    source = models.resolve(None)
    assert source.kind == "gguf" and source.location.endswith(".gguf")
    assert models.available_locally("smollm2-135m")


def test_embedded_model_architecture(smollm):
    arch = models.architecture(smollm.model.config)
    assert (arch.num_layers, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (30, 9, 3, 64)
    assert arch.group == 3
    assert smollm.fingerprint.startswith("sha256:") and len(smollm.fingerprint) == 23


def test_embedded_model_answers_a_short_question(smollm):
    tokenizer, model = smollm.tokenizer, smollm.model
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, ids["input_ids"].shape[1]:])


def test_fingerprint_is_stable_and_sensitive(smollm):
    assert models.fingerprint(smollm.model.config, smollm.tokenizer) == smollm.fingerprint
    other = LlamaConfig(**{**smollm.model.config.to_dict(), "num_hidden_layers": 2})
    assert models.fingerprint(other, smollm.tokenizer) != smollm.fingerprint


def test_local_folder_round_trip(smollm, tmp_path):
    config = LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    smollm.tokenizer.save_pretrained(tmp_path)
    loaded = models.load(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.source.kind == "dir"
    assert models.architecture(loaded.model.config).num_kv_heads == 2
    assert loaded.fingerprint != smollm.fingerprint


@pytest.mark.parametrize(
    "name, message",
    [
        ("smollm2", "unknown model 'smollm2'; did you mean smollm2-135m"),
        ("llama3-8b", "did you mean llama-3-8b"),
        ("gpt-17", "unknown model 'gpt-17'; `kvc models` lists the aliases"),
        ("llama-3-8b", "meta-llama/Meta-Llama-3-8B is not available offline"),
        ("someone/some-model", "someone/some-model is not available offline"),
        ("missing.gguf", "no such GGUF file"),
    ],
)
def test_resolution_errors(name, message, monkeypatch):
    with pytest.raises(KvcError, match=message.replace("?", r"\?")):
        models.resolve(name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `load` names it before importing transformers
    with pytest.raises(KvcError, match=message.replace("?", r"\?")):
        models.load(name)


def test_files_that_are_not_models(tmp_path, monkeypatch):
    monkeypatch.setenv("KVC_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(KvcError, match="not a model"):
        models.resolve(str(text))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvcError, match="has no config.json"):
        models.resolve(str(tmp_path / "empty"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(KvcError, match="fake.gguf: the GGUF file cannot be read"):
        models.load(str(fake))
    fake.write_text("not a model at all")
    with pytest.raises(KvcError, match="fake.gguf: not a GGUF file"):
        models.load(str(fake))
    assert not any((tmp_path / "cache").rglob("config.json"))


@pytest.mark.parametrize("device, dtype, message", [("tpu", "auto", "expected auto, cpu"), ("cpu", "int3", "expected auto")])
def test_bad_device_and_dtype(device, dtype, message):
    with pytest.raises(KvcError, match=message):
        models.resolve_dtype(dtype, models.resolve_device(device))
