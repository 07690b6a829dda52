"""The embedded model (SmolLM2-135M, 30 layers, 9 query / 3 KV heads) exported once per session with a
plan compiled from a real profile (25%, 8-bit rows; the tiny models of test_export.py cover every
head kind): onnxruntime continues a 1,000-token passkey prompt with the torch runtime's greedy
tokens, and its weights are stored once for both graphs."""

import pytest

from kvc.compiler import compile_policy
from kvc.eval.passkey import passkey_sample
from kvc.export.agreement import compare
from kvc.export.exporter import export
from kvc.export.onnx import OnnxGenerator


@pytest.mark.slow
@pytest.mark.long
def test_the_embedded_model_exports_and_decodes_a_passkey_as_the_torch_runtime(smollm, passkey_policy, tmp_path):
    plan = compile_policy(passkey_policy, 0.25, max_len=1040)
    assert plan.kv_bits == 8 and plan.has("full").any() and plan.has("frequency").any()
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
