"""Head kinds and the tokens each one keeps (pure-torch reference).

A kind is a FastGen basic kind or a union of them, written with '+' in a canonical
order ('special+punct+frequency'). `keep_set` says which of a prefix's keys a head of
that kind keeps, given token classes, attention scores and its budgets. Everything
else in kvc (profiler, compiler, runtime, baselines) is defined against this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvc.policies.errors import KvcError

BASIC_KINDS = ("special", "punct", "frequency", "local", "full")

# FastGen's hybrid policies, cheapest first: each one is a superset of the previous.
FASTGEN_POLICIES = (
    "special",
    "special+punct",
    "special+punct+frequency",
    "special+punct+frequency+local",
    "full",
)

# Bit per basic kind, as stored in a compiled plan.
KIND_BITS = {"special": 1, "punct": 2, "frequency": 4, "local": 8, "full": 16}

DEFAULT_SINKS = 4


def kind_components(kind: str) -> tuple[str, ...]:
    """Split a kind into its basic kinds, canonical order; raise KvcError if it is not one."""
    if not isinstance(kind, str) or not kind:
        raise KvcError(f"a kind must be a non-empty string, got {kind!r}")
    parts = kind.split("+")
    unknown = [p for p in parts if p not in BASIC_KINDS]
    if unknown:
        raise KvcError(f"unknown kind {unknown[0]!r} (expected one of {', '.join(BASIC_KINDS)}, joined with '+')")
    if len(set(parts)) != len(parts):
        raise KvcError(f"kind {kind!r} names a component twice")
    if "full" in parts and len(parts) > 1:
        raise KvcError(f"kind {kind!r}: 'full' already keeps everything and takes no other component")
    return tuple(k for k in BASIC_KINDS if k in parts)


def canonical_kind(components) -> str:
    """The canonical name of a union of basic kinds."""
    return "+".join(kind_components("+".join(components)))


def kind_code(kind: str) -> int:
    """The plan's bitmask for a kind."""
    return sum(KIND_BITS[c] for c in kind_components(kind))


@dataclass(frozen=True)
class Budget:
    """How many tokens each budgeted component may keep (sinks go with 'special')."""

    sinks: int = DEFAULT_SINKS
    window: int = 0
    heavy: int = 0


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
