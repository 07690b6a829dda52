"""Capture post-RoPE queries and keys inside the model's own attention, through transformers'
`AttentionInterface`.

`capturing(model, observer)` registers the attention function `kvc_profile` and sets it on the
model only while the block runs, restoring the previous implementation after; nothing changes at
import. Inside the block each layer's attention is the observer's: it gets the layer's query, key,
value, mask and scale and returns the output, so the statistics and the output share one pass.
Any architecture whose attention goes through the interface works, without `output_attentions`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Protocol

from kvc.policies.errors import KvcError

PROFILE_ATTENTION = "kvc_profile"

# Attention features the profiler's attention does not compute; a profile of such a model would be wrong.
_UNSUPPORTED = {"softcap": "attention logit soft-capping", "s_aux": "learned attention sinks"}

_observer: contextvars.ContextVar = contextvars.ContextVar("kvc_profile_observer", default=None)


class AttentionObserver(Protocol):
    def attend(self, layer: int | None, query, key, value, attention_mask, scaling: float):
        """query (batch, heads, n, d), key and value (batch, kv_heads, n, d), the mask as the model
        passes it -> the attention output (batch, n, heads, d)."""


def profile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The active observer's attention; SDPA's when no observer is active."""
    from transformers import AttentionInterface

    observer = _observer.get()
    if observer is None:
        return AttentionInterface()["sdpa"](
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    for name, feature in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise KvcError(f"the profiler does not support models with {feature} ({name})")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return observer.attend(getattr(module, "layer_idx", None), query, key, value, attention_mask, scale), None


def register() -> None:
    """Make `kvc_profile` known to transformers, with SDPA's mask format (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PROFILE_ATTENTION, profile_attention)
    AttentionMaskInterface.register(PROFILE_ATTENTION, AttentionMaskInterface()["sdpa"])


@contextlib.contextmanager
def capturing(model, observer: AttentionObserver):
    """Run the block with the model's attention reporting to `observer`; restore it after."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROFILE_ATTENTION)
    token = _observer.set(observer)
    try:
        if model.config._attn_implementation != PROFILE_ATTENTION:
            raise KvcError(
                f"{type(model).__name__} cannot switch its attention function through transformers' "
                "AttentionInterface, so the profiler cannot observe it"
            )
        yield
    finally:
        _observer.reset(token)
        model.set_attn_implementation(previous)
