"""`kvc.apply(model, plan, tokenizer)`: switch a model to kvc attention, after checking the plan fits.

Applying sets the model's attention implementation to 'kvc' and adds a forward pre-hook on its
base model that hands each forward's input ids (token classes) and padding to a
`CompressedCache`. Nothing changes a model before `apply`; `restore(model)`, or leaving the
`with kvc.apply(...)` block, puts the previous attention back and removes the hook.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Self

from kvc.models import LoadedModel, fingerprint
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.runtime import attention
from kvc.runtime.cache import CompressedCache, pending_layer

_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Applied:
    """A model running kvc attention; a context manager that restores it on exit."""

    model: object
    plan: Plan
    fingerprint: str
    previous_attention: str
    hook: object

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        restore(self.model)

    def cache(self, kernels: str = "auto") -> CompressedCache:
        """A fresh compressed cache for this model and plan."""
        return CompressedCache(self.plan, self.model, kernels)

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
    if model in _applied:
        restore(model)
    attention.register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.ATTENTION_NAME)
    if model.config._attn_implementation != attention.ATTENTION_NAME:
        raise KvcError(f"{type(model).__name__} does not run its attention through transformers' "
                       "AttentionInterface, so the compressed cache cannot serve it")
    hook = model.base_model.register_forward_pre_hook(_observe_inputs, with_kwargs=True)
    _applied[model] = Applied(model, plan, model_fingerprint, previous, hook)
    return _applied[model]


def restore(model) -> None:
    """Undo `apply`: the model's previous attention implementation, no input hook."""
    model = model.model if isinstance(model, LoadedModel) else model
    state = _applied.pop(model, None)
    if state is None:
        return
    state.hook.remove()
    model.set_attn_implementation(state.previous_attention)


def applied_fingerprint(model) -> str | None:
    """The fingerprint `apply` checked for this model, or None when it is not applied."""
    state = _applied.get(model)
    return None if state is None else state.fingerprint


def sliding_windows(config) -> list[int | None]:
    """Per layer, the model's sliding attention window (None for full attention)."""
    config = config.get_text_config()
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * layers
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise KvcError(f"layers of type {', '.join(unknown)} are not supported by the compressed cache "
                       "(full and sliding-window attention are)")
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def _observe_inputs(module, args, kwargs):
    """Forward pre-hook: give a CompressedCache the input ids and padding of the forward about to run."""
    pending_layer.set(None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, CompressedCache):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache.observe(input_ids, kwargs.get("attention_mask"))
