"""Triton kernels of the kvc runtime, each beside its pure-PyTorch reference with the same signature.

The plain names dispatch: Triton on CUDA tensors or under TRITON_INTERPRET=1, the reference otherwise.
"""

from kvc.runtime.kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    decode_attention_triton,
    use_triton,
)
from kvc.runtime.kernels.prefill_scoring import (
    gather_into_segments,
    gather_into_segments_reference,
    gather_into_segments_triton,
    observation_scores,
    observation_scores_reference,
    observation_scores_triton,
)

__all__ = [
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_triton",
    "gather_into_segments",
    "gather_into_segments_reference",
    "gather_into_segments_triton",
    "observation_scores",
    "observation_scores_reference",
    "observation_scores_triton",
    "use_triton",
]
