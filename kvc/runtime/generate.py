"""Prompts to text through a model, with a plan's compressed cache or the full one.

Used by `kvc generate`, the demo and the evaluation: tokenises (optionally through the chat
template), left-pads a batch, decodes greedily with `model.generate` (or, with `compile=True`, a
plan's step under `torch.compile`, the same tokens faster once compiled), and reports the cache
bytes against a full cache of the same tokens, and the decode speed.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from kvc.models import LoadedModel, architecture
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.report import human_bytes
from kvc.runtime.applied import applied_fingerprint
from kvc.runtime.apply import apply, cache_keyword
from kvc.runtime.cache import GENERATE_OPTIONS, CompressedCache
from kvc.runtime.step import Step, greedy, stop_ids


@dataclass
class Generation:
    texts: list[str]
    prompt_tokens: list[int]  # per prompt, without padding
    new_tokens: int  # decoding steps run (the longest continuation)
    cached_tokens: int  # positions a full cache holds at the end (padded prompt + new tokens - 1)
    cache_bytes: int  # what the cache allocated
    full_cache_bytes: int  # a full cache of the cached tokens, in the same dtype
    prefill_seconds: float
    decode_seconds: float
    plan_compression: float | None = None  # the plan's bytes against a full cache at its max_len
    max_len: int = 0
    token_ids: list[list[int]] | None = None  # per prompt, the generated tokens
    compile_seconds: float | None = None  # with a compiled step: its first call, left out of decode_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second after the first token (after the compiling step too; per sequence of the batch)."""
        steps = self.new_tokens - 1 - (self.compile_seconds is not None)
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: the cache bytes used against a full cache of the same tokens, and the speed."""
        tokens = self.cached_tokens
        speed = f"decode {self.decode_tokens_per_second:.1f} tokens/s"
        if self.compile_seconds is not None:
            speed += f" (compiled; the first step took {self.compile_seconds:.0f} s)"
        if self.plan_compression is None:
            return f"kv cache: {human_bytes(self.cache_bytes)} (full cache) for {tokens} tokens; {speed}"
        return (f"kv cache: {human_bytes(self.cache_bytes)} compressed (static plan, {self.plan_compression:.1%} of a "
                f"full cache at {self.max_len} tokens) vs {human_bytes(self.full_cache_bytes)} for a full cache of "
                f"these {tokens} tokens; {speed}")


class _StepClock(LogitsProcessor):
    """Notes when each step's logits are ready: the first call ends the prefill."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def encode_prompts(tokenizer, prompts: list[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt; with chat, as one user turn of the tokenizer's chat template."""
    if not chat:
        return [tokenizer(prompt).input_ids for prompt in prompts]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True) for prompt in prompts]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest), padded on the left."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, longest - len(ids):] = torch.tensor(ids)
        attention_mask[row, longest - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def full_cache_bytes(config, tokens: int, batch: int, dtype: torch.dtype) -> int:
    """Bytes of a full K/V cache of `tokens` positions for every layer and KV head."""
    arch = architecture(config.get_text_config())
    element = torch.tensor([], dtype=dtype).element_size()
    return arch.num_layers * arch.num_kv_heads * tokens * arch.head_dim * 2 * element * batch


def dense_cache_bytes(cache) -> int:
    """Bytes of the keys and values a transformers DynamicCache or StaticCache holds."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def generate(
    loaded: LoadedModel,
    prompts: str | list[str],
    plan: Plan | None = None,
    max_new_tokens: int = 64,
    chat: bool = False,
    kernels: str = "auto",
    compile: bool = False,
) -> Generation:
    """Greedy continuation of each prompt; with a plan, through its compressed cache.

    compile: decode with the plan's step under `torch.compile(fullgraph=True)` (`kvc.runtime.step`):
    the same tokens; the first step compiles (minutes on a CPU), the others run faster than eagerly."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise KvcError("generate: give at least one prompt")
    if not all(isinstance(prompt, str) and prompt.strip() for prompt in prompts):
        raise KvcError("generate: every prompt must be a non-empty string")
    if max_new_tokens < 1:
        raise KvcError(f"generate: max_new_tokens is {max_new_tokens}; give at least 1")
    if compile and plan is None:
        raise KvcError("generate: compile runs a plan's compressed step; give a plan")
    sequences = encode_prompts(tokenizer, prompts, chat)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(sequences, pad_id, model.device)
    clock = _StepClock()
    options = {"attention_mask": attention_mask, "max_new_tokens": max_new_tokens, "do_sample": False,
               "pad_token_id": pad_id, "logits_processor": LogitsProcessorList([clock])}
    began = time.perf_counter()
    keyword = cache_keyword(model)
    compile_seconds = None
    with torch.no_grad():
        if plan is None:
            cache = DynamicCache(config=model.config)
            output = model.generate(input_ids, **{keyword: cache}, **options)
        else:
            plan.check_length(input_ids.shape[1] + max_new_tokens)
            with nullcontext() if applied_fingerprint(model) else apply(loaded, plan):  # keep a caller's apply
                cache = CompressedCache(plan, model, kernels)
                if compile:
                    output, compile_seconds = _compiled_greedy(model, cache, input_ids, attention_mask,
                                                               max_new_tokens, pad_id, clock)
                else:
                    output = model.generate(input_ids, **{keyword: cache}, **options, **GENERATE_OPTIONS)
    ended = time.perf_counter()
    continuations = output[:, input_ids.shape[1]:]
    cached_tokens = output.shape[1] - 1  # the last token is never fed back
    if plan is None:
        cache_bytes = full_bytes = dense_cache_bytes(cache)
    else:
        cache_bytes = cache.nbytes()
        full_bytes = full_cache_bytes(model.config, cached_tokens, len(prompts), cache.layers[0].store.dtype)
    return Generation(
        texts=tokenizer.batch_decode(continuations, skip_special_tokens=True),
        prompt_tokens=[len(ids) for ids in sequences],
        new_tokens=continuations.shape[1],
        cached_tokens=cached_tokens,
        cache_bytes=cache_bytes,
        full_cache_bytes=full_bytes,
        prefill_seconds=clock.times[0] - began,
        decode_seconds=ended - clock.times[0] - (compile_seconds or 0.0),
        plan_compression=None if plan is None else plan.compression,
        max_len=0 if plan is None else plan.target.max_len,
        token_ids=continuations.tolist(),
        compile_seconds=compile_seconds,
    )


def _compiled_greedy(model, cache, input_ids, attention_mask, max_new_tokens, pad_id, clock):
    """The prompt through the cache, then greedy steps compiled: (prompt and new tokens, the first step's seconds).

    Positions as transformers gives them: each sequence counts from its first non-padding token."""
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    logits = model(input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=1,
                   **{cache_keyword(model): cache}).logits
    clock(None, logits)
    new, first_step = greedy(Step(model, cache, compile=True), logits[:, -1:].argmax(-1), max_new_tokens,
                             stop_ids(model), pad_id)
    return torch.cat([input_ids, new], 1), first_step
