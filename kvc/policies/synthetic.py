"""Synthetic policies: valid, realistic profiles of an imaginary model, for tests and benchmarks.

Each KV head spreads its attention over five parts: sinks and special tokens, punctuation, a
recency-decaying local part, a few heavy hitters and a diffuse rest. Every kind keeps a concave
share of each part at a given budget, which gives monotone, concave-ish curves. Lower layers
are broad (much diffuse attention), upper ones narrow (sinks, local); a few retrieval heads
attend everywhere, end up `full` and have high retrieval scores (the others low ones).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from kvc.policies.kinds import FASTGEN_POLICIES
from kvc.policies.schema import (
    Curve,
    HeadProfile,
    LayerProfile,
    ModelInfo,
    Policy,
    ProfileInfo,
    TokenSets,
)

CURVE_POINTS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
WINDOW_POINTS = [16, 64, 256, 1024]
HEAD_TYPES = ("local", "heavy", "sink", "retrieval")


def _capture(x, scale):
    """Share of a part kept at budget fraction x when it decays with length scale `scale`; 0 -> 0, 1 -> 1."""
    return (1 - np.exp(-np.asarray(x, dtype=float) / scale)) / (1 - np.exp(-1 / scale))


def _union(a, b):
    return 1 - (1 - a) * (1 - b)


class SyntheticHead:
    """The attention parts of one KV head and what each kind keeps of them."""

    def __init__(self, rng: np.random.Generator, depth: float, head_type: str, prompt_tokens: int, sinks: int):
        broad = 0.3 * (1 - depth) ** 3 + 0.01
        mass = {"special": 0.08, "punct": rng.uniform(0.03, 0.1), "local": 0.15, "heavy": 0.15, "diffuse": broad}
        if head_type == "sink":  # nearly all attention on sinks, special tokens and punctuation
            mass["special"] += rng.uniform(3, 12)
            mass["punct"] += rng.uniform(0, 0.5)
        else:
            mass[{"local": "local", "heavy": "heavy", "retrieval": "diffuse"}[head_type]] += rng.uniform(0.4, 0.7)
        total = sum(mass.values())
        self.mass = {part: value / total for part, value in mass.items()}
        self.local_scale = float(np.exp(rng.uniform(np.log(0.002), np.log(0.05))))
        self.heavy_scale = float(np.exp(rng.uniform(np.log(0.003), np.log(0.05))))
        self.special_fraction = sinks / prompt_tokens + rng.uniform(0.002, 0.01)
        self.punct_fraction = rng.uniform(0.06, 0.14)
        self.sink_share = rng.uniform(0.6, 0.95)

    def recovery(self, special: bool, punct: bool, heavy, window):
        """Attention kept by the special/punct classes plus heavy and window budgets (fractions)."""
        heavy, window = np.asarray(heavy, dtype=float), np.asarray(window, dtype=float)
        kept = {
            "special": 1.0 if special else _union(np.minimum(1, heavy / self.special_fraction), window),
            "punct": 1.0 if punct else _union(_capture(heavy, self.punct_fraction), window),
            "local": _union(_capture(window, self.local_scale), _capture(heavy, 4 * self.local_scale)),
            "heavy": _union(_capture(heavy, self.heavy_scale), window),
            "diffuse": _union(heavy, window),
        }
        return sum(self.mass[part] * kept[part] for part in self.mass)

    def curves(self, points) -> dict[str, np.ndarray]:
        x = np.asarray(points, dtype=float)
        return {
            "local": self.recovery(False, False, 0, x),
            "frequency": self.recovery(False, False, x, 0),
            "special+local": self.recovery(True, False, 0, x),
            "special+punct+frequency": self.recovery(True, True, x, 0),
            "special+punct+frequency+local": self.recovery(True, True, x / 2, x / 2),
        }

    def fastgen(self, ratio: float) -> dict[str, float]:
        return {
            "special": self.recovery(True, False, 0, 0),
            "special+punct": self.recovery(True, True, 0, 0),
            "special+punct+frequency": self.recovery(True, True, ratio, 0),
            "special+punct+frequency+local": self.recovery(True, True, ratio, ratio),
            "full": 1.0,
        }


def _noisy(values, rng: np.random.Generator) -> list[float]:
    """Measurement noise, then monotone in budget and within [0, 1], rounded like a profile."""
    noisy = np.clip(np.asarray(values, dtype=float) * (1 + rng.normal(0, 0.002, np.shape(values))), 0, 1)
    return [round(float(v), 5) for v in np.maximum.accumulate(noisy)]


def _head_profile(index: int, head: SyntheticHead, rng, prompt_tokens: int, threshold: float, ratio: float,
                  retrieval: float) -> HeadProfile:
    fastgen = dict(zip(FASTGEN_POLICIES, _noisy(list(head.fastgen(ratio).values()), rng)))
    fastgen["full"] = 1.0
    kind = next(k for k in FASTGEN_POLICIES if fastgen[k] >= threshold)
    windows = np.minimum(1.0, np.asarray(WINDOW_POINTS) / prompt_tokens)
    return HeadProfile(
        index=index, kind=kind, components=kind.split("+"), recovery=fastgen[kind], fastgen=fastgen,
        curves={k: Curve(list(CURVE_POINTS), _noisy(v, rng)) for k, v in head.curves(CURVE_POINTS).items()},
        window_curves={k: Curve([float(w) for w in WINDOW_POINTS], _noisy(head.curves(windows)[k], rng))
                       for k in ("local", "special+local")},
        sink_mass=round(head.mass["special"] * head.sink_share, 5),
        punct_fraction=round(head.punct_fraction, 5), special_fraction=round(head.special_fraction, 5),
        retrieval=round(retrieval, 5),
    )


def _funnel(heads: list[SyntheticHead]) -> float:
    """Mean share of keys that carry 90% of a head's attention when keeping heavy hitters."""
    grid = np.linspace(0, 1, 1001)
    return round(float(np.mean([grid[np.argmax(h.recovery(False, False, grid, 0) >= 0.9)] for h in heads])), 4)


def synthetic_policy(
    num_layers: int = 32,
    num_attention_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    seed: int = 0,
    *,
    max_position_embeddings: int = 32768,
    vocab_size: int = 32000,
    prompt_tokens: int = 1024,
    threshold: float = 0.95,
    retrieval_share: float = 0.05,
    name: str | None = None,
) -> Policy:
    """A validated policy for an imaginary model of the given shape; the same seed gives the same policy."""
    rng = np.random.default_rng(seed)
    retrieval_rng = np.random.default_rng([seed, 1])  # a stream of its own: the other numbers stay as they were
    shape = {"num_layers": num_layers, "num_attention_heads": num_attention_heads, "num_kv_heads": num_kv_heads,
             "head_dim": head_dim, "max_position_embeddings": max_position_embeddings, "vocab_size": vocab_size}
    digest = hashlib.sha256(json.dumps({**shape, "seed": seed, "synthetic": True}, sort_keys=True).encode())
    profile = ProfileInfo(prompt_set="synthetic", prompt_count=16, token_counts=[prompt_tokens] * 16,
                          threshold=threshold, probe_scheme="synthetic", dtype="float32", device="none")
    layers = []
    for layer in range(num_layers):
        depth = layer / max(1, num_layers - 1)
        others = np.array([0.45, 0.35, 0.1 + 0.4 * depth])
        types = rng.choice(HEAD_TYPES, size=num_kv_heads, p=[*(others / others.sum() * (1 - retrieval_share)), retrieval_share])
        heads = [SyntheticHead(rng, depth, str(t), prompt_tokens, profile.sinks) for t in types]
        layers.append(LayerProfile(
            index=layer, funnel=_funnel(heads),
            heads=[_head_profile(i, h, rng, prompt_tokens, threshold, profile.local_ratio,
                                 retrieval_rng.uniform(0.15, 0.5) if t == "retrieval" else retrieval_rng.uniform(0, 0.01))
                   for i, (h, t) in enumerate(zip(heads, types))],
        ))
    special = [0, 1, 2] + sorted(rng.choice(np.arange(3, vocab_size), size=5, replace=False).tolist())
    punctuation = sorted(set(rng.choice(np.arange(10, vocab_size), size=min(200, vocab_size // 4), replace=False).tolist()) - set(special))
    policy = Policy(
        model=ModelInfo(name=name or f"synthetic-{num_layers}x{num_kv_heads}", fingerprint="sha256:" + digest.hexdigest()[:16],
                        source="synthetic", architecture="SyntheticForCausalLM", **shape),
        profile=profile, tokens=TokenSets(special=special, punctuation=punctuation), layers=layers,
        kvc_version="synthetic", created="1970-01-01T00:00:00Z",
    )
    return Policy.from_dict(policy.to_dict())
