"""The kvc attention function, registered with transformers' `AttentionInterface` as 'kvc'.

It finds the `CompressedCache` among its keyword arguments (`apply`'s input hook adds it to the
model's forward, which hands it down to every attention call). Prefill runs the model's usual SDPA
attention (with its mask), then stores each head's keep-set; any later chunk (one token or many)
runs the store's `extend` over the compressed slots, never over a full K/V. A probe read after a
context (`kvc.runtime.probe`) is attended by its scoring layer, which scores the context's keys from
the same softmax. Without a compressed cache it is plain SDPA, so an applied model still works as
before. Masks for 'kvc' are SDPA masks.
"""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvc.policies.errors import KvcError
from kvc.runtime.cache import CACHE_KEYWORD

ATTENTION_NAME = "kvc"


def kvc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (batch, q_heads, q_len, head_dim); key, value (batch, kv_heads, q_len, head_dim) as `update` returned them.

    Returns (output (batch, q_len, q_heads, head_dim), None).
    """
    cache = kwargs.pop(CACHE_KEYWORD, None)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if cache is None:
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise KvcError("this model's attention uses logit soft-capping or learned sinks, which the compressed "
                       "decode does not implement")
    layer = cache.layers[module.layer_idx]
    if getattr(layer, "reading_probe", False):  # a probe after a context (`kvc.runtime.probe`): it scores the context
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return layer.read_probe(query, key, value, scale), None
    if layer.prefilling:
        output = sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer.compress(query, key, value, scaling)
        return output
    return layer.extend(query, key, value, scaling).transpose(1, 2), None


def register() -> None:
    """Make 'kvc' known to transformers (idempotent; changes no model)."""
    AttentionInterface.register(ATTENTION_NAME, kvc_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
