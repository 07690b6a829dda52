"""One decode step as a static program: the model's forward over a compressed cache, for `torch.compile`.

`generate` is the easy way to decode; a serving loop, a CUDA graph or a compiler wants the step on
its own, with fixed shapes and nothing decided on the host inside it. `Step(model, cache)` runs the
forward for a chunk of new tokens with explicit positions; the cache's host-side token count is
advanced outside the compiled region. `Step(..., compile=True)` compiles it with
`torch.compile(fullgraph=True)`: a graph break is an error, not a slow path. `greedy` decodes with a
step as transformers' greedy search does (`kvc generate --compile`).
"""

from __future__ import annotations

import time

import torch

from kvc.runtime.apply import cache_keyword
from kvc.runtime.cache import CompressedCache


# Inductor's locality reordering moves reads of the cache's buffers after the step's writes into them,
# which stops it writing in place: each layer's rows were then copied out and back every step (75 MB
# of copies per step at 7,680 tokens on the 25% plan). Without it the writes touch only their slots.
COMPILE_OPTIONS = {"reorder_for_locality": False}


class Step:
    """Call with input ids (batch, chunk) after the cache holds a prompt; returns logits (batch, chunk, vocab)."""

    def __init__(self, model, cache: CompressedCache, compile: bool = False):
        self.model = model
        self.cache = cache
        self.keyword = cache_keyword(model)
        self.compiled = compile
        self.forward = torch.compile(self._forward, fullgraph=True, options=COMPILE_OPTIONS) if compile else self._forward

    def _forward(self, input_ids, cache_position, position_ids):
        output = self.model(input_ids=input_ids, cache_position=cache_position, position_ids=position_ids,
                            use_cache=True, **{self.keyword: self.cache})
        return output.logits

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, chunk = input_ids.shape
        first = self.cache.length
        self.cache.plan.check_length(first + chunk)
        cache_position = torch.arange(first, first + chunk, device=input_ids.device)
        start = self.cache.layers[0].store.start  # left padding: each sequence counts from its first token
        position_ids = cache_position[None, :] - start[:, None].to(cache_position.dtype)
        with torch.no_grad():
            logits = self.forward(input_ids, cache_position, position_ids)
        if self.compiled:  # the compiled forward leaves the host count to us
            self.cache.advance(chunk)
        return logits


def stop_ids(model) -> list[int]:
    """The token ids that end a sequence in the model's generation config (what `greedy` stops at)."""
    stops = model.generation_config.eos_token_id
    return [] if stops is None else [stops] if isinstance(stops, int) else list(stops)


def greedy(step: Step, first: torch.Tensor, new_tokens: int, stop_tokens=(), pad_id: int = 0
           ) -> tuple[torch.Tensor, float | None]:
    """Up to `new_tokens` greedy tokens (batch, n) from `first` (batch, 1), the prefill's next tokens,
    as transformers' greedy search gives them: a sequence that produced a stop token is padded after
    it, and decoding ends once every sequence has. Also returns the seconds of the first step (where
    a compiled step compiles; None when no step ran)."""
    stops = torch.tensor(list(stop_tokens), dtype=first.dtype, device=first.device)
    token, tokens, first_step = first, [first], None
    running = ~torch.isin(first, stops)
    while len(tokens) < new_tokens and bool(running.any()):
        began = time.perf_counter()
        token = torch.where(running, step(token)[:, -1:].argmax(-1), pad_id)
        running &= ~torch.isin(token, stops)
        tokens.append(token)
        if len(tokens) == 2:
            first_step = time.perf_counter() - began
    return torch.cat(tokens, 1), first_step
