"""Triton kernels of the kvc runtime, each beside its pure-PyTorch reference with the same signature.

The plain names dispatch: Triton on CUDA tensors or under TRITON_INTERPRET=1, the reference otherwise.
"""

from kvc.runtime.kernels.prefill_scoring import (
    gather_slots,
    gather_slots_reference,
    gather_slots_triton,
    observation_scores,
    observation_scores_reference,
    observation_scores_triton,
    pool_scores,
)
from kvc.runtime.kernels.slot_attention import (
    slot_attention,
    slot_attention_reference,
    slot_attention_triton,
    softmax_with_lse,
    use_triton,
)

__all__ = [
    "gather_slots",
    "gather_slots_reference",
    "gather_slots_triton",
    "observation_scores",
    "observation_scores_reference",
    "observation_scores_triton",
    "pool_scores",
    "slot_attention",
    "slot_attention_reference",
    "slot_attention_triton",
    "softmax_with_lse",
    "use_triton",
]
