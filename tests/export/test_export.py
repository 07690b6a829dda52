"""`kvc export` and onnxruntime: the exported prefill and step graphs give the torch runtime's logits.

Two tiny random-weight models, each exported once per module: a Llama (2 KV heads of 2 query heads)
with 8-bit rows and one token per step, exported through the CLI as a user does; a GQA Qwen2-style
model (3 query heads per KV head, biased projections) with bf16 rows and four tokens per step,
through the Python API. Every head kind is in both plans. onnxruntime is a real session here.
"""

import dataclasses
import json
import os

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import kvc
from kvc.cli import main
from kvc.export.exporter import export
from kvc.export.onnx import OnnxGenerator
from kvc.models import LoadedModel, fingerprint, load
from kvc.policies.errors import KvcError
from kvc.runtime.generate import generate
from kvc.runtime.handmade import handmade_plan
from kvc.runtime.step import Step

KINDS = [["special+punct+frequency+local", "full"], ["local", "frequency"]]
PROMPT = ("Commas, colons: and full stops. Then more words follow here, and here. And more text: here! "
          "The window moves on; the sinks stay.")
TOLERANCE = 1e-4  # float32 logits, summed in another order


def run(capsys, *args):
    with pytest.raises(SystemExit) as done:
        main(list(args))
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def llama(tiny_model_dir, tmp_path_factory):
    """The tiny Llama folder, its 8-bit plan and the export folder `kvc export` wrote."""
    loaded = load(str(tiny_model_dir), dtype="float32", device="cpu")
    plan = handmade_plan(loaded.model.config, loaded.tokenizer, KINDS, 160, class_slots=4, heavy=4, window=6,
                         kv_bits=8)
    folder = tmp_path_factory.mktemp("llama-export")
    plan_path = plan.save(folder / "tiny.plan")
    with pytest.raises(SystemExit) as done:
        main(["export", str(tiny_model_dir), "--plan", str(plan_path), "--out", str(folder / "onnx")])
    assert done.value.code == 0
    return loaded, plan, plan_path, folder / "onnx"


@pytest.fixture(scope="module")
def qwen(smollm, tmp_path_factory):
    """A GQA Qwen2-style model with a bf16 plan merging evicted tokens, exported with four tokens per step."""
    torch.manual_seed(1)
    config = Qwen2Config(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(smollm.tokenizer),
                         use_sliding_window=False)
    model = Qwen2ForCausalLM(config).eval()
    loaded = LoadedModel(model, smollm.tokenizer, None, fingerprint(model.config, smollm.tokenizer))
    plan = handmade_plan(config, smollm.tokenizer, KINDS, 160, class_slots=4, heavy=4, window=6, dtype="bfloat16")
    plan.merge_similarity = -1.0  # every evicted prompt token joins a heavy hitter: the prefill graph merges too
    folder = tmp_path_factory.mktemp("qwen-export") / "onnx"
    export(loaded, plan, folder, chunk=4)
    return loaded, plan, folder


def torch_runtime_logits(loaded, plan, input_ids, chunks):
    """The torch runtime's last prefill logits and each chunk's logits through `Step`."""
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        cache = applied.cache()
        prefill = loaded.model(input_ids, **{applied.cache_keyword: cache}).logits[:, -1]
        step = Step(loaded.model, cache)
        return prefill, [step(chunk) for chunk in chunks]


def onnx_logits(generator, input_ids, chunks):
    logits, state = generator.prefill([input_ids[0].tolist()])
    steps = []
    for chunk in chunks:
        output, state = generator.step(chunk.numpy(), state)
        steps.append(torch.from_numpy(output))
    return torch.from_numpy(logits), steps, state


def check_prefill_and_ten_steps(loaded, plan, folder, chunk_size, input_ids=None):
    if input_ids is None:
        input_ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    generator = OnnxGenerator(folder, device="cpu")
    chunks = [torch.randint(0, loaded.model.config.vocab_size, (1, chunk_size), generator=torch.Generator().manual_seed(i))
              for i in range(10)]
    expected_prefill, expected_steps = torch_runtime_logits(loaded, plan, input_ids, chunks)
    prefill, steps, state = onnx_logits(generator, input_ids, chunks)
    torch.testing.assert_close(prefill, expected_prefill, atol=TOLERANCE, rtol=0)
    for got, expected in zip(steps, expected_steps):
        assert got.shape == expected.shape == (1, chunk_size, loaded.model.config.vocab_size)
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    # the state onnxruntime holds between steps is the plan's per-sequence bytes; its tables are in the graphs
    assert generator.state_bytes(state) == plan.cache_bytes - plan.table_bytes
    return generator


def test_llama_8bit_rows_prefill_and_ten_steps_match_the_torch_runtime(llama):
    loaded, plan, _, folder = llama
    generator = check_prefill_and_ten_steps(loaded, plan, folder, chunk_size=1)
    codes = [entry for entry in generator.manifest["state"] if entry["name"].endswith(".codes")]
    assert codes and all(entry["dtype"] == "uint8" for entry in codes)


@pytest.mark.parametrize("length", [1, 3])
def test_prompts_shorter_than_the_observation_window_are_not_padded(llama, length):
    """The prefill graph takes any length from one token: a 1- or 3-token prompt runs as the torch
    runtime runs it (unpadded), and the state counts exactly its tokens."""
    loaded, plan, _, folder = llama
    assert length < plan.observation_window
    input_ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids[:, :length]
    generator = check_prefill_and_ten_steps(loaded, plan, folder, chunk_size=1, input_ids=input_ids)
    _, state = generator.prefill([input_ids[0].tolist()])
    seen = state[generator.state_names.index("layer0.seen")].numpy()
    assert seen.tolist() == [length]


def test_qwen2_gqa_bf16_rows_chunks_of_four_match_the_torch_runtime(qwen):
    loaded, plan, folder = qwen
    input_ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    dropped = dataclasses.replace(plan, merge_similarity=None)
    chunk = [torch.arange(4)[None]]
    merged, kept = (torch_runtime_logits(loaded, p, input_ids, chunk)[1][0] for p in (plan, dropped))
    assert not torch.equal(merged, kept)  # merging changes what the prompt leaves for the steps after it
    generator = check_prefill_and_ten_steps(loaded, plan, folder, chunk_size=4)
    rows = [entry for entry in generator.manifest["state"] if entry["name"].endswith(".rows")]
    assert rows and all(entry["dtype"] == "bfloat16" for entry in rows)
    with pytest.raises(KvcError, match="--chunk 1"):
        generator.generate(PROMPT, 4)


def test_the_folder_holds_graphs_weights_once_plan_tokenizer_and_manifest(llama):
    import onnx

    loaded, plan, plan_path, folder = llama
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == loaded.fingerprint == plan.fingerprint
    assert manifest["plan"]["cache_bytes"] == plan.cache_bytes
    assert (folder / "model.plan").read_bytes() == plan_path.read_bytes()
    assert (folder / "tokenizer.json").is_file()
    parameter_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    weights = (folder / "weights.bin").stat().st_size
    assert parameter_bytes <= weights < 1.05 * parameter_bytes  # both graphs' weights, stored once
    for name in ("prefill", "step"):
        graph = onnx.load(folder / f"{name}.onnx", load_external_data=False)
        external = {entry.value for tensor in graph.graph.initializer for entry in tensor.external_data
                    if entry.key == "location"}
        assert external == {"weights.bin"}
    assert sorted(os.listdir(folder.parent)) == ["onnx", "tiny.plan"]  # no staging folder left behind


def test_the_graphs_compute_nothing_from_small_constants_alone_nor_twice(llama):
    """The exporter folds what a graph computes from its constants alone (the plan's tables, shapes),
    leaving only work on constants too large to copy aside (the tied embedding's transpose), and
    computes each repeated expression once: no two nodes take the same inputs the same way."""
    import collections

    import numpy
    import onnx
    from onnx.helper import get_attribute_value
    from onnx.numpy_helper import to_array

    def size(value):  # a Constant's tensor or list of numbers
        return to_array(value).size if isinstance(value, onnx.TensorProto) else numpy.size(value)

    folder = llama[3]
    for name in ("prefill", "step"):
        graph = onnx.load(folder / f"{name}.onnx", load_external_data=False).graph
        sizes = {tensor.name: int(torch.Size(tensor.dims).numel()) for tensor in graph.initializer}
        sizes |= {node.output[0]: size(get_attribute_value(node.attribute[0])) for node in graph.node
                  if node.op_type == "Constant"}
        of_constants = [(node.op_type, max(sizes[given] for given in node.input if given)) for node in graph.node
                        if node.op_type != "Constant" and node.input and all(given in sizes for given in node.input if given)]
        embedding = llama[0].model.get_output_embeddings().weight.numel()
        assert of_constants == [("Transpose", embedding)], (name, of_constants)
        expressions = collections.Counter((node.op_type, node.domain, tuple(node.input),
                                           tuple(a.SerializeToString() for a in node.attribute)) for node in graph.node)
        assert [key[0] for key, count in expressions.items() if count > 1] == [], name


def test_the_tracer_records_no_stack_traces_only_while_the_exporter_traces(llama):
    """The exporter turns the tracer's per-node stack traces off while it traces (the saved graphs
    drop them) and gives the setting back as it was, also when tracing fails."""
    import torch.fx.config

    from kvc.export.exporter import _without_stack_traces

    assert torch.fx.config.do_not_emit_stack_traces is False  # after the module's exports
    with pytest.raises(RuntimeError), _without_stack_traces():
        assert torch.fx.config.do_not_emit_stack_traces is True
        raise RuntimeError("the trace failed")
    assert torch.fx.config.do_not_emit_stack_traces is False


def test_generate_onnx_greedy_equals_the_torch_runtime_and_samples_reproducibly(llama, capsys):
    loaded, plan, _, folder = llama
    expected = generate(loaded, PROMPT, plan, max_new_tokens=12).texts[0]
    generator = OnnxGenerator(folder, device="cpu")
    assert generator.generate(PROMPT, 12).texts[0] == expected
    sampled = [generator.generate(PROMPT, 12, temperature=1.5, seed=seed).tokens for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # 12 tokens of a random model at T = 1.5
    code, out, _ = run(capsys, "generate", "--onnx", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12",
                       "--device", "cpu")
    assert code == 0 and " ".join(expected.split()) in " ".join(out.split())
    assert "onnxruntime (CPUExecutionProvider)" in out and "the plan's bytes" in out
    code, out, _ = run(capsys, "generate", "--onnx", str(folder), "--prompt", PROMPT, "--temperature", "1.5")
    assert code == 0 and "onnxruntime" in out


def test_a_plan_of_another_model_is_refused_and_nothing_is_written(llama, capsys, tmp_path):
    _, _, plan_path, _ = llama
    code, out, err = run(capsys, "export", "smollm2-135m", "--plan", str(plan_path), "--out", str(tmp_path / "x"))
    assert code == 2 and "compiled for" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_folder_errors_are_one_line(llama, capsys, tmp_path):
    _, _, plan_path, folder = llama
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "export", str(folder.parent), "--plan", str(plan_path), "--out", str(tmp_path / "mine"))
    assert code == 2 and "not an earlier export" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    code, _, err = run(capsys, "generate", "--onnx", str(tmp_path / "mine"), "--prompt", "hi")
    assert code == 2 and "manifest.json" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "generate", "--onnx", str(folder), "--plan", str(plan_path), "--prompt", "hi")
    assert code == 2 and "leave out MODEL and --plan" in err


def test_an_interrupted_export_leaves_the_earlier_export_as_it_was(llama, monkeypatch, tmp_path):
    from kvc.export import exporter

    loaded, plan, _, folder = llama
    target = tmp_path / "onnx"
    target.mkdir()
    (target / "manifest.json").write_text("{}")  # an earlier export (its manifest is all the check reads)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "_export_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(loaded, plan, target)
    assert sorted(os.listdir(tmp_path)) == ["onnx"] and os.listdir(target) == ["manifest.json"]


def test_eval_with_the_onnxruntime_backend_scores_what_the_torch_runtime_scores(llama, capsys, tmp_path, monkeypatch):
    """The harness finds the plan's export in the kvc cache (put there as its first use would) and the
    query-aware passkey completion through onnxruntime is the torch runtime's; both settings are run."""
    import shutil

    from kvc.export.cached import export_folder, plan_digest
    from kvc.models import cache_folder

    loaded, plan, plan_path, folder = llama
    monkeypatch.setenv("KVC_CACHE", str(tmp_path / "cache"))
    target = cache_folder("exports") / f"{loaded.fingerprint.replace('sha256:', '')}-{plan_digest(plan)}"
    shutil.copytree(folder, target)
    assert export_folder(loaded, plan) == target
    scores = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        code, _, err = run(capsys, "eval", str(loaded.source.location),
                           "--plan", str(plan_path), "--methods", "kvc", "--tasks", "passkey", "--lengths", "120",
                           "--depths", "0.5", "--budgets", "1", "--cache-dtype", "fp32", "--device", "cpu",
                           "--backend", backend, "--json", str(out))
        assert code == 0, err
        scores[backend] = json.loads(out.read_text())
    assert scores["onnxruntime"]["settings"]["backend"] == "onnxruntime"
    # the exported graphs run no probe: the record says what scored the context
    assert scores["onnxruntime"]["settings"]["context_probe"] == "window"
    assert scores["torch"]["settings"]["context_probe"] == "reconstruct+expected"
    torch_records, onnx_records = scores["torch"]["records"], scores["onnxruntime"]["records"]
    assert [r["setting"] for r in onnx_records] == [r["setting"] for r in torch_records] == ["query-aware",
                                                                                           "query-agnostic"]
    # Query-aware: the same prompt, the same tokens. Query-agnostic: the export feeds the question token
    # by token, the torch runtime as one chunk (test_a_question_after_the_context_... checks the former).
    assert onnx_records[0]["completion"] == torch_records[0]["completion"]
    assert [r["cache_bytes"] for r in onnx_records] == [r["cache_bytes"] for r in torch_records] == [plan.cache_bytes] * 2
    code, _, err = run(capsys, "eval", str(loaded.source.location), "--plan", str(plan_path), "--tasks", "ppl",
                       "--backend", "onnxruntime")
    assert code == 2 and "runs the tasks passkey, niah, not ppl" in err


def test_a_question_after_the_context_through_the_export_is_the_torch_runtime_token_by_token(llama):
    """Query-agnostic evaluation through the export: the context prefilled, the question fed one token per
    step, then greedy decoding; the torch runtime doing the same gives the same tokens and bytes."""
    from kvc.eval.exported import answer_exported
    from kvc.eval.questions import QUERY_AGNOSTIC, Prompt, greedy

    loaded, plan, _, folder = llama
    prompt = Prompt.encode(loaded.tokenizer, PROMPT * 2, " What stays, and what moves on?")
    answer = answer_exported(OnnxGenerator(folder), prompt, QUERY_AGNOSTIC, 8)
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        cache, keyword = applied.cache(), applied.cache_keyword
        logits = loaded.model(torch.tensor([prompt.context_ids]), **{keyword: cache}).logits[0, -1]
        for token in prompt.question_ids:
            logits = loaded.model(torch.tensor([[token]]), **{keyword: cache}).logits[0, -1]
        expected = greedy(loaded, cache, logits, 8)
    assert answer.tokens == expected
    assert answer.cache_bytes == plan.cache_bytes
