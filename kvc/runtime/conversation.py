"""A chat of several turns through one cache: each user turn extends what the cache already holds.

The cache keeps the conversation (the first prompt, each reply, each later turn); a new turn is the
text the chat template adds after what the cache holds, fed as one chunk (`extend`) before the reply
is decoded, so nothing is prefilled twice. A compressed cache keeps of earlier turns only what its
plan allows, which is the point: a long conversation in the memory of a short one. When the first
turn is a document the later turns ask about, a probe (`context_probe`, `kvc.runtime.probe`) can
pick what the plan's SnapKV-style heads keep of it, since its own last queries are not the questions.
With `compile=True` each reply is decoded by the plan's compiled step (`kvc.runtime.step`), compiled
during the first reply and reused by every later one; the turn's chunk still goes through eagerly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.runtime.apply import apply, cache_keyword
from kvc.runtime.cache import GENERATE_OPTIONS
from kvc.runtime.generate import dense_cache_bytes
from kvc.policies.probes import check_probe
from kvc.runtime.probe import make_probe, prefill_context
from kvc.runtime.step import Step, greedy, stop_ids


@dataclass
class Turn:
    user: str
    reply: str
    added_tokens: int  # tokens this turn fed into the cache before its reply (template and the user's text)
    new_tokens: int  # tokens of the reply
    cached_tokens: int  # tokens the conversation holds after the reply
    cache_bytes: int
    seconds: float


class Conversation:
    """Greedy chat with `loaded` through one cache: a plan's compressed cache, or the full cache."""

    def __init__(self, loaded: LoadedModel, plan: Plan | None = None, kernels: str = "auto",
                 context_probe: str = "window", compile: bool = False):
        if compile and plan is None:
            raise KvcError("a compiled conversation runs a plan's compressed step; give a plan")
        self.loaded = loaded
        self.context_probe = check_probe(context_probe)  # what scores the first turn (`kvc.runtime.probe`)
        tokenizer = loaded.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise KvcError(f"{loaded.source.name if loaded.source else 'this model'} has no chat template")
        self.keyword = cache_keyword(loaded.model)
        self.applied = apply(loaded, plan) if plan is not None else None
        self.cache = self.applied.cache(kernels) if plan is not None else DynamicCache(config=loaded.model.config)
        self.plan = plan
        self.step = Step(loaded.model, self.cache, compile=True) if compile else None
        self.messages: list[dict] = []
        self.history_ids: list[int] = []  # every token of the conversation (the last reply token is not fed yet)
        self.history_text = ""

    def say(self, text: str, max_new_tokens: int = 64) -> Turn:
        """Add a user turn, decode the reply greedily, keep both in the cache."""
        if not text.strip():
            raise KvcError("the user turn is empty")
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        messages = [*self.messages, {"role": "user", "content": text}]
        target = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        common = len(os.path.commonprefix([self.history_text, target]))
        added = tokenizer(target[common:], add_special_tokens=False).input_ids
        input_ids = torch.tensor([self.history_ids + added], device=model.device)
        if self.plan is not None:
            self.plan.check_length(input_ids.shape[1] + max_new_tokens)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        began = time.perf_counter()
        with torch.no_grad():
            if self.plan is not None and not self.history_ids and self.context_probe != "window":
                # The first turn (a document) is compressed before the questions: a probe scores it. The
                # last token stays out, so generate has one to feed.
                context = input_ids[0, :-1].tolist()
                prefill_context(model, self.cache, context, make_probe(tokenizer, context, self.context_probe))
            if self.step is None:
                output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                        **{self.keyword: self.cache}, **(GENERATE_OPTIONS if self.plan is not None else {}))
                reply_ids = output[0, input_ids.shape[1]:].tolist()
            else:
                reply_ids = self._compiled_reply(input_ids, max_new_tokens, pad_id)
        seconds = time.perf_counter() - began
        reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.history_ids = input_ids[0].tolist() + reply_ids
        self.history_text = target[:common] + tokenizer.decode(added + reply_ids, skip_special_tokens=False)
        return Turn(text, reply, len(added), len(reply_ids), len(self.history_ids) - 1, self.nbytes(), seconds)

    def _compiled_reply(self, input_ids, max_new_tokens: int, pad_id: int) -> list[int]:
        """What the cache does not hold yet goes in as one chunk, then the compiled step decodes the reply."""
        model = self.loaded.model
        chunk = input_ids[:, self.cache.get_seq_length():]
        logits = model(chunk, logits_to_keep=1, **{self.keyword: self.cache}).logits
        tokens, _ = greedy(self.step, logits[:, -1:].argmax(-1), max_new_tokens, stop_ids(model), pad_id)
        return tokens[0].tolist()

    def nbytes(self) -> int:
        if self.plan is not None:
            return self.cache.nbytes()
        return dense_cache_bytes(self.cache)

    def close(self) -> None:
        if self.applied is not None:
            self.applied.__exit__(None, None, None)

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
