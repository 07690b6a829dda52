"""A plan file is checked whole on load (header, tensors, heads, size against its budget) and against the
model it is applied to; every defect is one line naming the field, and nothing inconsistent is saved."""

import json

import pytest
import torch
from safetensors.torch import save
from transformers import LlamaConfig, LlamaForCausalLM

import kvc
from kvc.cli import main
from kvc.compiler import compile_policy
from kvc.models import fingerprint
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.policies.synthetic import synthetic_policy

GEOMETRY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "vocab_size": 100}


@pytest.fixture(scope="module")
def plan():
    """A compiled plan for a model of GEOMETRY's shape, at 30% of the full cache."""
    policy = synthetic_policy(2, 4, 2, 16, seed=3, max_position_embeddings=256, vocab_size=100)
    return compile_policy(policy, 0.3, max_len=256, kv_bits=0, strategy="knapsack")


def write(tmp_path, header, tensors, name="edited.plan"):
    """A plan file with exactly this header and these tensors (no check on the way)."""
    path = tmp_path / name
    path.write_bytes(save(tensors, metadata={"kvc_plan": json.dumps(header)}))
    return path


def refused(path, message) -> str:
    with pytest.raises(KvcError) as error:
        Plan.load(path)
    text = str(error.value)
    assert message in text and text.startswith(f"{path}: ") and "\n" not in text, text
    return text


def _set(table, value, at=(0, 0)):
    def edit(header, tensors):
        tensors[table] = tensors[table].clone()
        tensors[table][at] = value
    return edit


HEADER_DEFECTS = {
    "no version": (lambda h, t: h.pop("kvc_plan"), "kvc_plan: missing required key"),
    "no model": (lambda h, t: h.pop("model"), "model: missing required key"),
    "no target": (lambda h, t: h.pop("target"), "target: missing required key"),
    "no head_dim": (lambda h, t: h["model"].pop("head_dim"), "model.head_dim: missing required key"),
    "head_dim a string": (lambda h, t: h["model"].update(head_dim="16"), "model.head_dim: expected an integer, got '16'"),
    "head_dim 10^6": (lambda h, t: h["model"].update(head_dim=10**6), "model.head_dim: must be at most 1024"),
    "model a list": (lambda h, t: h.update(model=[1, 2]), "model: expected a mapping, got list"),
    "unknown dtype": (lambda h, t: h["target"].update(dtype="int3"), "target.dtype: unknown cache dtype 'int3'"),
    "max_len 2^30": (lambda h, t: h["target"].update(max_len=2**30), "target.max_len: must be at most 16777216"),
    "batch 10^9": (lambda h, t: h["target"].update(batch=10**9), "target.batch: must be at most 65536"),
    "budget of 10^20": (lambda h, t: h["target"].update(budget_bytes=10**20), "target.budget_bytes: must be at most"),
    "fraction infinite": (lambda h, t: h["target"].update(fraction=float("inf")), "target.fraction: expected a finite"),
    "layers disagree with tables": (lambda h, t: h["model"].update(num_layers=3),
                                    "tensor kind_codes: shape (2, 2) does not match the header's"),
    "heads not a multiple": (lambda h, t: h["model"].update(num_attention_heads=3),
                             "model.num_attention_heads: 3 is not a multiple of model.num_kv_heads 2"),
    "even pool kernel": (lambda h, t: h.update(pool_kernel=8), "pool_kernel: must be odd"),
    "observation window 0": (lambda h, t: h.update(observation_window=0), "observation_window: must be at least 1"),
    "bad bit width": (lambda h, t: h.update(kv_bits=5), "kv_bits: expected one of 2, 4, 8"),
    "notes a list": (lambda h, t: h.update(notes=[]), "notes: expected a mapping, got list"),
    "version": (lambda h, t: h.update(kvc_plan=2), "kvc_plan: unsupported plan version 2"),
}

TENSOR_DEFECTS = {
    "missing tensor": (lambda h, t: t.pop("window"), "tensor window: missing"),
    "float table": (lambda h, t: t.update(window=t["window"].float()), "tensor window: expected int32, got float32"),
    "window of 2^30": (_set("window", 2**30), "tensor window: layers[0].heads[0]: 1073741824 slots, more than "
                                              "target.max_len 256"),
    "negative heavy": (_set("heavy", -1), "tensor heavy: layers[0].heads[0]: -1 slots (negative)"),
    "unknown kind": (_set("kind_codes", 99), "tensor kind_codes: layers[0].heads[0]: 99 is not a kind"),
    "kind code 0": (_set("kind_codes", 0), "tensor kind_codes: layers[0].heads[0]: 0 is not a kind"),
    "recovery NaN": (_set("expected_recovery", float("nan")), "tensor expected_recovery: layers[0].heads[0]: nan"),
    "class bits": (_set("token_classes", 7, at=5), "tensor token_classes: token 5 has class bits 7"),
    "vocabulary a matrix": (lambda h, t: t.update(token_classes=t["token_classes"].reshape(10, 10)),
                            "tensor token_classes: expected one entry per token id"),
}


def _only(kind_code, **slots):
    """An edit making every head of `kind_code` with just these slots."""
    def edit(header, tensors):
        tensors["kind_codes"] = torch.full_like(tensors["kind_codes"], kind_code)
        for name in ("sinks", "class_slots", "heavy", "window", "full_slots"):
            tensors[name] = torch.full_like(tensors[name], slots.get(name, 0))
    return edit


CONSISTENCY_DEFECTS = {
    "full head short": (_only(16, full_slots=100), "a full head has 100 slots, not target.max_len 256"),
    "slots a kind cannot use": (_only(8, window=4, heavy=1),
                                "tensor heavy: layers[0].heads[0]: 1 slots on a head of kind code 8"),
    "capacity past max_len": (_only(12, heavy=200, window=200),
                              "tensor capacity: layers[0].heads[0]: 400 slots in all, more than target.max_len"),
    "over its budget": (lambda h, t: h["target"].update(budget_bytes=h["target"]["budget_bytes"] // 2,
                                                        fraction=h["target"]["fraction"] / 2),
                        "target.budget_bytes: the plan's cache takes"),
    "fraction and budget disagree": (lambda h, t: h["target"].update(fraction=0.9),
                                     "target.fraction: 0.9 does not match target.budget_bytes"),
}


def test_a_head_with_no_slots_loads(tmp_path, plan):
    """A plan may starve a head (it keeps nothing); the runtime handles it."""
    loaded = Plan.load(_edited(tmp_path, plan, _only(8)))
    assert int(loaded.capacity[0, 0]) == 0


def _edited(tmp_path, plan, edit):
    header, tensors = json.loads(json.dumps(plan.header())), dict(plan.tensors())
    edit(header, tensors)
    return write(tmp_path, header, tensors)


@pytest.mark.parametrize("case", sorted(HEADER_DEFECTS) + sorted(TENSOR_DEFECTS))
def test_every_defect_is_one_line_naming_the_field(tmp_path, plan, case):
    edit, message = {**HEADER_DEFECTS, **TENSOR_DEFECTS}[case]
    refused(_edited(tmp_path, plan, edit), message)


@pytest.mark.parametrize("case", sorted(CONSISTENCY_DEFECTS))
def test_heads_and_size_must_be_consistent(tmp_path, plan, case):
    edit, message = CONSISTENCY_DEFECTS[case]
    refused(_edited(tmp_path, plan, edit), message)


def test_full_heads_of_a_context_shorter_than_their_kind_code_load(tmp_path, plan):
    def short(header, tensors):
        _only(16, full_slots=8)(header, tensors)
        header["target"].update(max_len=8, budget_bytes=0)

    assert int(Plan.load(_edited(tmp_path, plan, short)).capacity.sum()) == 8 * 2 * 2


def test_the_unedited_plan_loads_and_an_inconsistent_one_is_never_saved(tmp_path, plan):
    assert Plan.load(_edited(tmp_path, plan, lambda h, t: None)).header() == plan.header()
    broken = Plan.load(plan.save(tmp_path / "copy.plan"))
    broken.window = broken.window.clone()
    broken.window[0, 0] = 2**20
    with pytest.raises(KvcError, match="tensor window: layers.0..heads.0.: 1048576 slots"):
        broken.save(tmp_path / "broken.plan")
    assert not (tmp_path / "broken.plan").exists()


def test_corrupt_files_are_named_for_what_they_are(tmp_path, plan):
    good = plan.save(tmp_path / "good.plan").read_bytes()
    cases = {
        "cut.plan": (good[: len(good) // 2], "not a readable plan (safetensors says"),
        "size.plan": (b"\xff" * 8 + good[8:], "not a readable plan (safetensors says"),
        "header.plan": (good.replace(b'"kvc_plan\\": 1,', b'"kvc_plan\\": 1}'), "the plan header is corrupt: not valid JSON"),
        "bare.plan": (save({"x": torch.zeros(2)}), "a safetensors file without kvc's plan header"),
        "list.plan": (save(plan.tensors(), metadata={"kvc_plan": "[1, 2]"}),
                      "the plan header is corrupt: expected a mapping, got list"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        refused(path, message)


def test_validate_reports_a_corrupt_plan_as_a_plan(tmp_path, plan, capsys):
    path = tmp_path / "corrupt.plan"
    path.write_bytes(b"\xff" * 8 + plan.save(tmp_path / "good.plan").read_bytes()[8:])
    with pytest.raises(SystemExit) as done:
        main(["validate", str(path)])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert "not a readable plan" in err and "YAML" not in err
    renamed = tmp_path / "corrupt.bin"  # no .plan name: the zero bytes of its header size still say "plan"
    renamed.write_bytes(b"\x07\x00\x00\x00\x10\x00\x00\x00" + path.read_bytes()[8:])
    with pytest.raises(SystemExit) as done:
        main(["validate", str(renamed)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "not a readable plan" in err and "YAML" not in err
    with pytest.raises(SystemExit) as done:
        main(["validate", str(tmp_path)])
    assert done.value.code == 2 and "is a folder, not a policy or plan file" in capsys.readouterr().err


GEOMETRY_DEFECTS = {
    "num_hidden_layers": (3, "the plan's model.num_layers is 2 but the model's num_hidden_layers is 3"),
    "num_attention_heads": (8, "the plan's model.num_attention_heads is 4 but the model's num_attention_heads is 8"),
    "num_key_value_heads": (1, "the plan's model.num_kv_heads is 2 but the model's num_key_value_heads is 1"),
    "head_dim": (32, "the plan's model.head_dim is 16 but the model's head_dim is 32"),
    "vocab_size": (120, "the plan's token_classes (vocabulary size) is 100 but the model's vocab_size is 120"),
    "max_position_embeddings": (128, "target.max_len 256 is beyond the model's max_position_embeddings 128"),
    "layer_types": (["full_attention"] * 3, "the model's layer_types lists 3 layers but the plan has 2"),
    "sliding_window": (-4, "the model's sliding_window is -4, not a positive number of tokens"),
}


def test_a_plan_fits_the_model_it_was_compiled_for(plan):
    plan.check_geometry(LlamaConfig(**GEOMETRY))


@pytest.mark.parametrize("field", sorted(GEOMETRY_DEFECTS))
def test_check_geometry_names_the_field_that_differs(plan, field):
    value, message = GEOMETRY_DEFECTS[field]
    config = LlamaConfig(**GEOMETRY)
    setattr(config, field, value)
    with pytest.raises(KvcError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan.check_geometry(config)


class Vocabulary:
    """The part of a tokenizer the fingerprint reads."""

    def get_vocab(self):
        return {f"t{i}": i for i in range(GEOMETRY["vocab_size"])}


def test_apply_refuses_a_plan_whose_geometry_differs_though_its_fingerprint_matches(plan):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**GEOMETRY)).eval()
    tokenizer = Vocabulary()
    matching = Plan(**{**vars(plan), "fingerprint": fingerprint(model.config, tokenizer)})
    with kvc.apply(model, matching, tokenizer):
        pass
    matching.head_dim = 32  # a header edited after compiling; the fingerprint does not cover it
    with pytest.raises(KvcError, match="model.head_dim is 32 but the model's head_dim is 16"):
        kvc.apply(model, matching, tokenizer)


def test_compile_refuses_a_plan_above_the_cache_bound_at_once():
    """A policy that validates (its numbers within kvc's bounds) can still ask for a giant plan:
    the compiler refuses any budget above MAX_CACHE_BYTES in one line before planning."""
    import time

    from kvc.policies.limits import MAX_BATCH, MAX_CACHE_BYTES, MAX_LEN

    huge = synthetic_policy(4, 32, 8, 1024, seed=1, max_position_embeddings=MAX_LEN, vocab_size=1000)
    started = time.perf_counter()
    with pytest.raises(KvcError, match=r"the budget \(--target 0.25 of .* TiB\) is above kvc's bound of 2.00 TiB"):
        compile_policy(huge, 0.25, batch=64)
    with pytest.raises(KvcError, match=r"the budget \(--memory 3.00 TiB\) is above kvc's bound"):
        compile_policy(huge, memory="3TiB")
    assert time.perf_counter() - started < 1.0
    for options, message in (({"max_len": MAX_LEN + 1}, "--max-len: expected a positive number of tokens up to"),
                             ({"batch": MAX_BATCH + 1}, "--batch: expected a positive number of sequences up to")):
        with pytest.raises(KvcError, match=message):
            compile_policy(huge, 0.25, **options)
    plan = compile_policy(huge, memory=MAX_CACHE_BYTES // 1024, max_len=2**16, strategy="uniform")
    assert plan.cache_bytes <= MAX_CACHE_BYTES // 1024
