"""The decode step as one static program: `Step` under `torch.compile(fullgraph=True)` (a graph break
fails the test) decodes the same tokens as the eager step, on a tiny random Llama whose plan has
every kind of head and 8-bit rows; the eager step continues a prompt as `generate` does, and so does
`generate(..., compile=True)` on a padded batch with a stop token; the greedy loop's stops and pads."""

import re

import torch
from torch._inductor.utils import run_and_get_code
from transformers import LlamaConfig, LlamaForCausalLM

import kvc
from kvc.models import LoadedModel, fingerprint
from kvc.runtime.handmade import handmade_plan
from kvc.runtime.step import Step, greedy

KINDS = [["special+punct+frequency+local", "full"], ["local", "frequency"]]


def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=256, vocab_size=49152)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, tokenizer, None, fingerprint(model.config, tokenizer))


def decode(loaded, plan, input_ids, steps, compile, generated=None):
    """Greedy tokens of `steps` steps after the prompt; with `generated` (a dict), the compiled step's
    source code and the sizes of the cache's buffers go into it."""
    with kvc.apply(loaded, plan) as applied:
        cache = applied.cache()
        with torch.no_grad():
            token = loaded.model(input_ids, **{applied.cache_keyword: cache}).logits[:, -1:].argmax(-1)
        step, tokens = Step(loaded.model, cache, compile=compile), [int(token)]
        for index in range(steps):
            if index == 0 and generated is not None:
                logits, generated["code"] = run_and_get_code(step, token)
                generated["buffer_sizes"] = {tensor.numel() for layer in cache.layers
                                             for tensor in layer.store.held_tensors() if tensor.numel() > 64}
            else:
                logits = step(token)
            token = logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        assert cache.get_seq_length() == input_ids.shape[1] + steps
    return tokens


def test_the_compiled_step_has_no_graph_break_and_decodes_as_eager(smollm):
    loaded = tiny_llama(smollm.tokenizer)
    plan = handmade_plan(loaded.model.config, smollm.tokenizer, KINDS, 64, class_slots=4, heavy=4, window=4, kv_bits=8)
    input_ids = smollm.tokenizer("Commas, colons: and full stops. Then more words follow here, and here.",
                                 return_tensors="pt").input_ids
    torch._dynamo.reset()
    eager = decode(loaded, plan, input_ids, 6, compile=False)
    generated = {}
    compiled = decode(loaded, plan, input_ids, 6, compile=True, generated=generated)  # fullgraph=True raises on any graph break
    assert compiled == eager
    # The step writes its new rows into the cache's buffers in place: no generated loop runs over a
    # whole buffer (a step that copied each layer's rows out and back, as inductor's locality
    # reordering made it do, has one per buffer and direction).
    loops = {int(size) for size in re.findall(r"x0<static_cast<int64_t>\((\d+)L\)", "".join(generated["code"]))}
    assert loops and not loops & generated["buffer_sizes"], sorted(loops & generated["buffer_sizes"])
    # Inductor hands to aten only what it cannot generate: the token classes' `isin`, which it
    # computes by sorting. The codes' place values as `2 ** arange`, an integer power, were an aten
    # call in every layer.
    fallbacks = set(re.findall(r"torch\.ops\.aten\.(\w+)", "".join(generated["code"])))
    assert fallbacks <= {"sort", "searchsorted"}, fallbacks


def test_the_eager_step_continues_as_generate(smollm):
    loaded = tiny_llama(smollm.tokenizer)
    plan = handmade_plan(loaded.model.config, smollm.tokenizer, KINDS, 64, class_slots=4, heavy=4, window=4)
    input_ids = smollm.tokenizer("A short prompt, with commas.", return_tensors="pt").input_ids
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        output = loaded.model.generate(input_ids, **{applied.cache_keyword: applied.cache()}, do_sample=False,
                                       max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert decode(loaded, plan, input_ids, 5, compile=False) == output[0, input_ids.shape[1]:].tolist()


def test_generate_never_lets_transformers_compile_the_compressed_step(smollm):
    """transformers compiles generate's decode forward for a compileable cache (on CUDA; here forced on the
    CPU); a compiled forward would leave the cache's token count behind, so kvc's generate turns it off."""
    from transformers import CompileConfig

    from kvc.runtime.generate import generate

    loaded = tiny_llama(smollm.tokenizer)
    plan = handmade_plan(loaded.model.config, smollm.tokenizer, KINDS, 64, class_slots=4, heavy=4, window=4)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    loaded.model.generation_config.compile_config = compile_config
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result = generate(loaded, "A short prompt, with commas.", plan, max_new_tokens=5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing was compiled
    assert result.new_tokens == 5


def test_compiled_generate_gives_generates_tokens(smollm):
    """`generate(..., compile=True)` decodes a left-padded batch with the compiled step: the tokens
    `model.generate` gives, a sequence that ends (here at a stop token chosen from the eager run)
    padded after it as transformers pads it."""
    from kvc.runtime.generate import generate

    loaded = tiny_llama(smollm.tokenizer)
    plan = handmade_plan(loaded.model.config, smollm.tokenizer, KINDS, 64, class_slots=4, heavy=4, window=4,
                         kv_bits=8, batch=2)
    prompts = ["A short prompt, with commas.", "A longer prompt: it has more words, and it pads the other one."]
    tokens = generate(loaded, prompts, plan, max_new_tokens=8).token_ids
    stop = tokens[0][3]
    assert stop not in tokens[0][:3]
    loaded.model.generation_config.eos_token_id = stop
    eager = generate(loaded, prompts, plan, max_new_tokens=8)
    torch._dynamo.reset()
    compiled = generate(loaded, prompts, plan, max_new_tokens=8, compile=True)
    pad = smollm.tokenizer.pad_token_id
    assert eager.token_ids[0][:4] == tokens[0][:4] and eager.token_ids[0][4:] == [pad] * 4 != eager.token_ids[1][4:]
    assert compiled.token_ids == eager.token_ids
    assert compiled.compile_seconds > 0 and eager.compile_seconds is None
    assert "(compiled; the first step took" in compiled.summary()


def test_greedy_pads_stopped_sequences_and_ends_when_all_have_stopped():
    """The loop alone, over a scripted step that answers each sequence's next token from a table:
    a sequence that produced a stop token gets the pad id after it, decoding ends once both have
    stopped, and a single new token runs no step."""
    script = torch.tensor([[5, 7, 9, 9, 9], [6, 8, 9, 4, 3]])  # the token each sequence produces at each step
    calls = []

    def step(tokens):
        calls.append(tokens.clone())
        return torch.nn.functional.one_hot(script[:, len(calls)], 10)[:, None].float()

    tokens, first_step = greedy(step, script[:, :1], 10, stop_tokens=[7, 3], pad_id=0)
    assert tokens.tolist() == [[5, 7, 0, 0, 0], [6, 8, 9, 4, 3]] and first_step > 0
    assert [call[:, 0].tolist() for call in calls] == [[5, 6], [7, 8], [0, 9], [0, 4]]  # the pads are fed back
    calls.clear()
    tokens, first_step = greedy(step, script[:, :1], 1, stop_tokens=[7])
    assert tokens.tolist() == [[5], [6]] and first_step is None and not calls


def test_a_compiled_conversation_replies_as_the_eager_one(smollm):
    """`Conversation(..., compile=True)`: each turn's chunk goes in eagerly, the replies come from the
    compiled step (compiled once, in the first reply), and they are the eager conversation's."""
    from kvc.runtime.conversation import Conversation

    loaded = tiny_llama(smollm.tokenizer)
    plan = handmade_plan(loaded.model.config, smollm.tokenizer, KINDS, 128, class_slots=4, heavy=4, window=4, kv_bits=8)
    turns = ["Name one colour, please.", "And another one, with commas, colons: anything."]
    replies, graphs = {}, torch._dynamo.utils.counters["stats"]
    for compile in (False, True):
        torch._dynamo.reset()
        before = graphs["unique_graphs"]
        with Conversation(loaded, plan, compile=compile) as conversation:
            replies[compile] = [(turn.reply, turn.new_tokens, turn.cached_tokens)
                                for turn in (conversation.say(text, 5) for text in turns)]
    assert replies[True] == replies[False] and all(reply for reply, *_ in replies[False])
    assert graphs["unique_graphs"] == before + 1  # compiled once: the second reply reused the first one's graph
