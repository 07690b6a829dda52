"""Low-bit K/V rows: each cached key or value vector stored as codes plus float16 group parameters.

A vector is first turned by a fixed orthogonal matrix R (the normalised Hadamard matrix when
head_dim is a power of two, else a seeded random rotation), which spreads a few outlier channels
over all of them (the idea of QuaRot and QuIP#). The turned vector is cut into groups of
`quant_group(head_dim)` channels; each group keeps its step and minimum as float16 and every channel
as an unsigned `bits`-bit code, round-to-nearest (KIVI's asymmetric min/max quantiser, taken per
token for keys and values alike, so that a slot stays self-contained: heads evict and move single
tokens). Codes are packed low bits first, 8 / bits to a byte.

Rows stay turned in the cache and are read where they lie: since R is orthogonal,
q·k = (qR)·(kR), so attention turns the query once and its output back once (`turn`, `turn_back`)
instead of every cached row. Codes and parameters are separate tensors; packing is integer
multiply and sum, unpacking float multiply and floor by powers of two (no dtype reinterpretation,
no bit shifts), so the same code exports to ONNX.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from kvc.plan import QUANT_BITS, quant_group


class Rows(NamedTuple):
    """Low-bit rows: codes (..., head_dim * bits / 8) uint8 and params (..., groups, 2) float16 (step, minimum)."""

    codes: torch.Tensor
    params: torch.Tensor


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


def turn(x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """(..., head_dim) vectors into the turned space the rows live in, as float32 (matrix: the rotation)."""
    return x.float() @ (rotation(x.shape[-1], x.device) if matrix is None else matrix)


def turn_back(x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """(..., head_dim) turned vectors back into the model's space, as float32."""
    return x.float() @ (rotation(x.shape[-1], x.device) if matrix is None else matrix).T


def _check(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits}: expected one of {QUANT_BITS}")


def _place_values(bits: int, device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """(8 // bits,) place value of each code inside its byte, low bits first."""
    # A constant, not `2 ** arange`: inductor cannot generate an integer power, and called aten for
    # one in every layer of a compiled step.
    return torch.tensor([1 << shift for shift in range(0, 8, bits)], device=device, dtype=dtype)


def encode_turned(turned: torch.Tensor, bits: int) -> Rows:
    """(..., head_dim) already-turned vectors -> low-bit rows."""
    _check(bits)
    head_dim = turned.shape[-1]
    group = quant_group(head_dim)
    grouped = turned.float().reshape(*turned.shape[:-1], head_dim // group, group)
    low = grouped.amin(-1).to(torch.float16)
    step = ((grouped.amax(-1) - low.float()) / (2 ** bits - 1)).to(torch.float16)
    # The codes are computed from the rounded float16 parameters, the ones reading will use.
    safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
    codes = torch.round((grouped - low.float()[..., None]) / safe[..., None]).clamp_(0, 2 ** bits - 1)
    codes = codes.to(torch.int32).reshape(*turned.shape[:-1], head_dim * bits // 8, 8 // bits)
    packed = (codes * _place_values(bits, turned.device)).sum(-1).to(torch.uint8)
    return Rows(packed, torch.stack([step, low], -1))


def encode(x: torch.Tensor, bits: int, matrix: torch.Tensor | None = None) -> Rows:
    """(..., head_dim) floats -> low-bit rows of their turned vectors."""
    return encode_turned(turn(x, matrix), bits)


def decode_turned(rows: Rows, bits: int, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Low-bit rows -> (..., head_dim) turned vectors in `dtype` (what attention reads).

    out: a float32 buffer of the result's shape to decode into instead of a fresh one (eager
    readers reuse one per block): the codes go straight into it, with no float copy of them."""
    _check(bits)
    codes, params = rows
    if bits < 8:
        if out is None:
            values = _unpack(codes.to(torch.float32), bits)
        else:
            values = _unpack(codes, bits, out.view(*codes.shape, 8 // bits))
        values = values.reshape(*codes.shape[:-1], codes.shape[-1] * (8 // bits))
    else:
        values = codes.to(torch.float32) if out is None else out.copy_(codes)
    groups = params.shape[-2]
    grouped = values.reshape(*values.shape[:-1], groups, values.shape[-1] // groups)
    params = params.float()
    # In place on the float codes: one float buffer per call rather than three.
    return grouped.mul_(params[..., 0:1]).add_(params[..., 1:2]).reshape(values.shape).to(dtype)


def _unpack(packed: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(..., bytes) packed codes -> (..., bytes, 8 // bits) codes as floats, low bits first.

    Float multiplies by powers of two, floors and fractions, all exact below 256, in one buffer:
    `byte // place % 2**bits` is here the fraction of `floor(byte / place) / 2**bits`, times 2**bits.
    On a CPU integer division and remainder are not vectorised: they ran 2-3 times slower, eagerly
    and compiled, and a float remainder 20 times slower compiled. Without `out`, `packed` holds the
    bytes as floats; with it, the bytes themselves go into its first place (whose value is 1) and
    the other places are multiplied from there (3 x 2,048 rows of 4-bit codes: 100-180 us against
    290-345 us for floats made first, one thread)."""
    factors = 1 / _place_values(bits, packed.device, torch.float32)
    if out is None:
        codes = packed[..., None] * factors
    else:
        out[..., 0].copy_(packed)
        torch.mul(out[..., :1], factors[1:], out=out[..., 1:])
        codes = out
    return codes.floor_().mul_(1 / 2 ** bits).frac_().mul_(2 ** bits)


def decode(rows: Rows, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Low-bit rows -> (..., head_dim) vectors in the model's space, in `dtype`."""
    return turn_back(decode_turned(rows, bits)).to(dtype)
