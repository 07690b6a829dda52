"""Head kinds: their names, bits and budgets (torch-free, so a policy is read and checked without torch).

A kind is a FastGen basic kind or a union of them, written with '+' in a canonical
order ('special+punct+frequency'). `kvc.policies.keep.keep_set` says which of a prefix's
keys a head of that kind keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

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
