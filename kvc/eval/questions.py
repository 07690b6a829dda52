"""A context and a question, answered by every method's cache after one shared prefill.

Query-aware: the prompt is the context and the question, compressed together (the question sits in
the observation window). Query-agnostic: the context alone is compressed, then the question is
appended to the compressed cache as one chunk (`extend`), as when a cached document serves many
questions; every method's scores are then computed without the question: the baselines' by the
context's last queries, as published, kvc's by a probe after the context (`kvc.runtime.probe`). Either way the prefill
forward is the same whatever the plan, so it runs once (`SharedPrefill`) and fills every method's
cache; each then decodes its answer greedily on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvc.eval.settings import SETTINGS
from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.runtime.apply import apply, cache_keyword
from kvc.runtime.cache import CompressedCache
from kvc.runtime.probe import make_probe, prefill_context
from kvc.runtime.shared_prefill import SharedPrefill

QUERY_AWARE, QUERY_AGNOSTIC = SETTINGS


@dataclass(frozen=True)
class Prompt:
    context_ids: list[int]
    question_ids: list[int]  # asked after the context

    @classmethod
    def encode(cls, tokenizer, context: str, question: str) -> Prompt:
        """The context as a prompt (the tokenizer's special tokens included), the question as what follows it."""
        return cls(tokenizer(context).input_ids, tokenizer(question, add_special_tokens=False).input_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


@dataclass(frozen=True)
class Answer:
    tokens: list[int]  # greedy, up to and including an end-of-sequence token
    cache_bytes: int


def stop_tokens(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    eos = loaded.tokenizer.eos_token_id if eos is None else eos
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def answer_all(loaded: LoadedModel, plans: list[Plan], prompt: Prompt, setting: str, new_tokens: int,
               kernels: str = "auto", probe: str = "window", probed: list[bool] | None = None) -> list[Answer]:
    """Each plan's greedy answer to the prompt's question in `setting`, after one prefill for all.

    Query-agnostic, the plans marked in `probed` (default: none) score their frequency heads by
    `probe` run after the context (`kvc.runtime.probe`); the others by the context's last queries.
    """
    assert setting in SETTINGS, setting
    model = loaded.model
    probed = probed or [False] * len(plans)
    keyword = cache_keyword(model)
    answers = []
    with torch.no_grad(), apply(loaded, plans[0]):
        caches = [CompressedCache(plan, model, kernels, probe_scoring) for plan, probe_scoring in zip(plans, probed)]
        if setting == QUERY_AWARE:
            inputs = torch.tensor([prompt.context_ids + prompt.question_ids], device=model.device)
            logits = model(input_ids=inputs, **{keyword: SharedPrefill(caches)}, logits_to_keep=1).logits[0, -1]
        else:
            prefill_context(model, SharedPrefill(caches), prompt.context_ids,
                            make_probe(loaded.tokenizer, prompt.context_ids, probe) if any(probed) else None)
        for index, cache in enumerate(caches):
            if setting == QUERY_AWARE:
                first = logits
            else:
                question = torch.tensor([prompt.question_ids], device=model.device)
                first = model(input_ids=question, **{keyword: cache}, logits_to_keep=1).logits[0, -1]
            answers.append(Answer(greedy(loaded, cache, first, new_tokens), cache.nbytes()))
            caches[index] = None  # its memory goes before the next method decodes
    return answers


def greedy(loaded: LoadedModel, cache, logits: torch.Tensor, new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens from the next-token logits, fed one by one through the cache; stops
    after an end-of-sequence token."""
    model, stops, tokens = loaded.model, stop_tokens(loaded), []
    keyword = cache_keyword(model)
    while True:
        token = int(logits.argmax())
        tokens.append(token)
        if token in stops or len(tokens) == new_tokens:
            return tokens
        inputs = torch.tensor([[token]], device=model.device)
        logits = model(input_ids=inputs, **{keyword: cache}, logits_to_keep=1).logits[0, -1]
