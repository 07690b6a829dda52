"""The embedded model (SmolLM2-135M, 30 layers, 9 query / 3 KV heads) exported once per session with a
plan holding every head kind and 8-bit rows: onnxruntime continues a 1,000-token passkey prompt with
the torch runtime's greedy tokens, and its weights are stored once for both graphs."""

import pytest

from kvc.eval.passkey import passkey_sample
from kvc.export.agreement import compare
from kvc.export.exporter import export
from kvc.export.onnx import OnnxGenerator
from kvc.runtime.handmade import handmade_plan

KINDS = ("special+punct+frequency+local", "full", "special+local", "frequency", "local")


@pytest.mark.slow
def test_the_embedded_model_exports_and_decodes_a_passkey_as_the_torch_runtime(smollm, tmp_path):
    config = smollm.model.config
    kinds = [[KINDS[(layer + head) % len(KINDS)] for head in range(config.num_key_value_heads)]
             for layer in range(config.num_hidden_layers)]
    plan = handmade_plan(config, smollm.tokenizer, kinds, 1040, class_slots=32, heavy=64, window=128, kv_bits=8)
    folder = export(smollm, plan, tmp_path / "onnx").folder
    parameter_bytes = sum(p.numel() * p.element_size() for p in smollm.model.parameters())
    assert parameter_bytes <= (folder / "weights.bin").stat().st_size < 1.05 * parameter_bytes
    generator = OnnxGenerator(folder, device="cpu")
    ids = smollm.tokenizer(passkey_sample(smollm.tokenizer, 1000, 0.5, seed=1).text).input_ids
    agreement = compare(smollm, plan, generator, ids, 8)
    assert agreement.same_tokens, agreement
    # The prefill's logits (full attention over the prompt) agree to float order; later steps read 8-bit
    # codes, where a key that differs in its last float bits can round to the neighbouring code.
    assert agreement.logit_differences[0] < 1e-3, agreement
