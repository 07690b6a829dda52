"""The kvc attention function, registered with transformers' `AttentionInterface` as 'kvc'.

Prefill runs the model's usual SDPA attention (with its mask), then stores each head's keep-set.
Decode attends over the compressed segments (`decode_attention`), never over a full K/V. Without
a `CompressedCache` (any other cache, or none) it is plain SDPA, so an applied model still works
as before. Masks for 'kvc' are SDPA masks.
"""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvc.policies.errors import KvcError
from kvc.runtime.cache import pending_layer

ATTENTION_NAME = "kvc"


def kvc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (batch, q_heads, q_len, head_dim); key, value as `update` returned them.

    Returns (output (batch, q_len, q_heads, head_dim), None).
    """
    layer = pending_layer.get()
    pending_layer.set(None)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if layer is None:
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    assert layer.store.layer == module.layer_idx, "kvc attention ran for another layer than the cache update"
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise KvcError("this model's attention uses logit soft-capping or learned sinks, which the compressed "
                       "decode does not implement")
    if layer.prefilling:
        output = sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer.compress(query, key, value, scaling)
        return output
    output = layer.store.attend(query[:, :, 0], scaling)  # (batch, q_heads, head_dim)
    return output[:, None], None


def register() -> None:
    """Make 'kvc' known to transformers (idempotent; changes no model)."""
    AttentionInterface.register(ATTENTION_NAME, kvc_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
