"""`kvc.apply(model, plan, tokenizer)`: switch a model to kvc attention, after checking the plan fits.

Applying sets the model's attention implementation to 'kvc' and adds two hooks on its base model:
before each forward, a `CompressedCache` passed to it observes the input ids (token classes) and
padding, and is handed on to the attention function as a keyword argument the model passes down
to every layer; after it, the cache counts the forward's tokens. Nothing changes a model before
`apply`; `restore(model)`, or leaving the `with kvc.apply(...)` block, puts the previous attention
back and removes the hooks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Self

from kvc.models import LoadedModel, fingerprint
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.runtime import attention
from kvc.runtime.applied import applied_fingerprint, mark_applied, mark_restored, sliding_windows
from kvc.runtime.cache import CACHE_KEYWORD, CompressedCache


@dataclass
class Applied:
    """A model running kvc attention; a context manager that restores it on exit."""

    model: object
    plan: Plan
    fingerprint: str
    previous_attention: str
    hooks: tuple

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        restore(self.model)

    def cache(self, kernels: str = "auto", probe_scoring: bool = True) -> CompressedCache:
        """A fresh compressed cache for this model and plan."""
        return CompressedCache(self.plan, self.model, kernels, probe_scoring)

    @property
    def cache_keyword(self) -> str:
        return cache_keyword(self.model)


def cache_keyword(model) -> str:
    """The keyword `forward` and `generate` take a cache by: `cache` from transformers 5.24, `past_key_values` before."""
    if isinstance(model, LoadedModel):
        model = model.model
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def apply(model, plan: Plan, tokenizer=None) -> Applied:
    """Run `model` with kvc attention under `plan`; refuse a plan compiled for another model.

    model: a transformers causal LM (with `tokenizer`) or a `LoadedModel`.
    """
    if isinstance(model, LoadedModel):
        model, model_fingerprint = model.model, model.fingerprint
    elif tokenizer is None:
        raise KvcError("kvc.apply needs the tokenizer (or a LoadedModel) to check the plan's fingerprint")
    else:
        model_fingerprint = fingerprint(model.config, tokenizer)
    plan.check_model(model_fingerprint)
    plan.check_geometry(model.config)
    sliding_windows(model.config)
    if applied_fingerprint(model) is not None:
        restore(model)
    attention.register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.ATTENTION_NAME)
    if model.config._attn_implementation != attention.ATTENTION_NAME:
        raise KvcError(f"{type(model).__name__} does not run its attention through transformers' "
                       "AttentionInterface, so the compressed cache cannot serve it")
    hooks = (model.base_model.register_forward_pre_hook(_observe_inputs, with_kwargs=True),
             model.base_model.register_forward_hook(_count_tokens, with_kwargs=True))
    state = Applied(model, plan, model_fingerprint, previous, hooks)
    mark_applied(model, state)
    return state


def restore(model) -> None:
    """Undo `apply`: the model's previous attention implementation, no hooks."""
    model = model.model if isinstance(model, LoadedModel) else model
    state = mark_restored(model)
    if state is None:
        return
    for hook in state.hooks:
        hook.remove()
    model.set_attn_implementation(state.previous_attention)


def _observe_inputs(module, args, kwargs):
    """Forward pre-hook: give a CompressedCache the input ids and padding of the forward about to
    run, and pass the cache on to the attention function."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not getattr(cache, "observes_inputs", False):
        kwargs.pop(CACHE_KEYWORD, None)
        return args, kwargs
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache.observe(input_ids, kwargs.get("attention_mask"))
    kwargs[CACHE_KEYWORD] = cache
    return args, kwargs


def _count_tokens(module, args, kwargs, output):
    """Forward hook: the forward is done, so the cache counts its tokens."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if getattr(cache, "observes_inputs", False):
        cache.finish()
