"""Low-bit K/V rows: each cached key or value vector stored as one row of bytes.

A vector is first turned by a fixed orthogonal matrix (the normalised Hadamard matrix when
head_dim is a power of two, else a seeded random rotation), which spreads a few outlier channels
over all of them (the idea of QuaRot and QuIP#), and turned back after decoding, so attention
sees the same geometry. The turned vector is cut into groups of `quant_group(head_dim)` channels;
each group keeps its minimum and step as float16 and every channel as an unsigned `bits`-bit
code, round-to-nearest (KIVI's asymmetric min/max quantiser, taken per token for keys and
values alike, so that a slot stays self-contained: heads evict and swap single tokens, which
KIVI's per-channel key groups of 32 tokens could not follow). Codes are packed low bits first,
8 / bits to a byte, and the row is [codes | steps | minimums], `quant_row_bytes` long. Because a row
is plain bytes, the store moves, swaps and gathers it like any other row.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from kvc.plan import QUANT_BITS, quant_group, quant_row_bytes

_PARAMS = torch.float16


def rotation(head_dim: int, device) -> torch.Tensor:
    """(head_dim, head_dim) float32 orthogonal matrix that every row is turned by before quantising."""
    return _rotation(head_dim, str(device))


@lru_cache(maxsize=None)
def _rotation(head_dim: int, device: str) -> torch.Tensor:
    if head_dim & (head_dim - 1) == 0:
        matrix = torch.ones(1, 1)
        while matrix.shape[0] < head_dim:
            matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
        return (matrix / head_dim ** 0.5).to(device)
    gaussian = torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(head_dim), dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q.float().to(device)


def _check(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits}: expected one of {QUANT_BITS}")


def encode(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., head_dim) floats -> (..., quant_row_bytes(head_dim, bits)) uint8 rows."""
    _check(bits)
    head_dim = x.shape[-1]
    group = quant_group(head_dim)
    turned = x.float() @ rotation(head_dim, x.device)
    grouped = turned.reshape(*x.shape[:-1], head_dim // group, group)
    low = grouped.amin(-1).to(_PARAMS)
    step = ((grouped.amax(-1) - low.float()) / (2 ** bits - 1)).to(_PARAMS)
    # The codes are computed from the rounded float16 parameters, the ones decode will use.
    safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
    codes = torch.round((grouped - low.float()[..., None]) / safe[..., None]).clamp_(0, 2 ** bits - 1)
    codes = codes.to(torch.uint8).reshape(*x.shape[:-1], head_dim // (8 // bits), 8 // bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device)
    packed = (codes << shifts).sum(-1, dtype=torch.uint8)
    params = torch.cat([step, low], -1).contiguous().view(torch.uint8)
    return torch.cat([packed, params], -1)


def decode(rows: torch.Tensor, bits: int, head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., quant_row_bytes(head_dim, bits)) uint8 rows -> (..., head_dim) in `dtype`."""
    _check(bits)
    assert rows.shape[-1] == quant_row_bytes(head_dim, bits), (rows.shape, head_dim, bits)
    group = quant_group(head_dim)
    groups = head_dim // group
    packed_bytes = head_dim * bits // 8
    packed = rows[..., :packed_bytes]
    params = rows[..., packed_bytes:].contiguous().view(_PARAMS).float()
    step, low = params[..., :groups], params[..., groups:]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=rows.device)
    codes = (packed[..., None] >> shifts) & (2 ** bits - 1)
    codes = codes.reshape(*rows.shape[:-1], groups, group).float()
    turned = (codes * step[..., None] + low[..., None]).reshape(*rows.shape[:-1], head_dim)
    return (turned @ rotation(head_dim, rows.device).T).to(dtype)
