"""The tokens each head kind keeps (pure-torch reference).

`keep_set` says which of a prefix's keys a head of a kind (`kvc.policies.kinds`) keeps, given
token classes, attention scores and its budgets. Everything else in kvc (profiler, compiler,
runtime, baselines) is defined against this.
"""

from __future__ import annotations

import torch

from kvc.policies.errors import KvcError
from kvc.policies.kinds import Budget, kind_components


def special_keep(is_special: torch.Tensor, sinks: int) -> torch.Tensor:
    """Special tokens and the first `sinks` positions (attention sinks). (..., L) -> bool."""
    positions = torch.arange(is_special.shape[-1], device=is_special.device)
    return is_special.bool() | (positions < sinks)


def local_keep(length: int, window: int, device=None) -> torch.Tensor:
    """The `window` most recent positions of a prefix of `length`. -> (L,) bool."""
    positions = torch.arange(length, device=device)
    return positions >= length - window


def frequency_keep(scores: torch.Tensor, heavy: int) -> torch.Tensor:
    """The `heavy` keys with the largest scores (ties: the earlier position). (..., L) -> bool."""
    length = scores.shape[-1]
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    heavy = min(max(heavy, 0), length)
    if heavy == 0:
        return keep
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return keep.scatter(-1, order[..., :heavy], True)


def keep_set(
    kind: str,
    is_special: torch.Tensor,
    is_punct: torch.Tensor,
    scores: torch.Tensor | None,
    budget: Budget,
) -> torch.Tensor:
    """The keys a head of `kind` keeps from a prefix.

    is_special, is_punct: (..., L) bool token classes of the prefix's keys;
    scores: (..., L) accumulated attention per key (needed by 'frequency');
    returns (..., L) bool.
    """
    components = kind_components(kind)
    shape = is_special.shape
    if "full" in components:
        return torch.ones(shape, dtype=torch.bool, device=is_special.device)
    keep = torch.zeros(shape, dtype=torch.bool, device=is_special.device)
    if "special" in components:
        keep |= special_keep(is_special, budget.sinks)
    if "punct" in components:
        keep |= is_punct.bool()
    if "frequency" in components:
        if scores is None:
            raise KvcError(f"kind {kind!r} keeps heavy hitters and needs attention scores")
        keep |= frequency_keep(scores, budget.heavy)
    if "local" in components:
        keep |= local_keep(shape[-1], budget.window, device=is_special.device)
    return keep
