"""Which models run kvc attention, and the model facts the cache reads: filled by `apply`, read by the cache.

A small registry keeps `apply` and `CompressedCache` independent of each other: the cache checks
that its model was applied (with the fingerprint `apply` checked) without importing `apply`.
"""

from __future__ import annotations

import weakref

from kvc.policies.errors import KvcError

_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> apply's state (has .fingerprint)


def mark_applied(model, state) -> None:
    _states[model] = state


def mark_restored(model):
    """Forget the model; returns apply's state, or None when it was not applied."""
    return _states.pop(model, None)


def applied_fingerprint(model) -> str | None:
    """The fingerprint `apply` checked for this model, or None when it is not applied."""
    state = _states.get(model)
    return None if state is None else state.fingerprint


def sliding_windows(config) -> list[int | None]:
    """Per layer, the model's sliding attention window (None for full attention)."""
    config = config.get_text_config()
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * layers
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise KvcError(f"layers of type {', '.join(unknown)} are not supported by the compressed cache "
                       "(full and sliding-window attention are)")
    return [window if kind == "sliding_attention" else None for kind in layer_types]
