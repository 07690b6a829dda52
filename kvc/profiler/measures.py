"""What the profiler measures, and where: probe queries, budgets, curve points, the per-layer sums.

Recovery (FastGen's F, DESIGN.md): for a keep-set, F = mean over probe queries i of
Σ_{j ∈ keep(i)} A_ij, where A_i = softmax(q_i·Kᵀ·scale) is query i's causal attention row over
its prefix of n = i + 1 keys. Heavy-hitter scores at probe i are H2O/FastGen accumulated
attention, Σ_{q ≤ i} A_qj, over all of the prompt's queries up to i. A KV head keeps one set for
its query group, chosen from the group's summed scores, and recovers the mean of its query heads'
recoveries with that set (DESIGN.md GQA). Budgets are round(x·n) tokens, at least 1 when x > 0.

Retrieval (DESIGN.md, after the retrieval heads of 2404.15574): a copy event is a query i whose
last COPY_NGRAM tokens appeared before, ending at j - 1 at least COPY_MIN_DISTANCE tokens back,
with t_j = t_{i+1}: the next token can be copied from position j. A head's retrieval score is its
mean attention A_ij over the prompts' copy events; a KV head takes the highest of its query group,
since one copying query head needs the group's keys.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from kvc.policies.kinds import DEFAULT_SINKS, Budget

# Budget points of the recovery curves: fractions of the prefix length.
CURVE_POINTS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
CURVE_KINDS = ("local", "frequency", "special+local", "special+punct+frequency", "special+punct+frequency+local")
# Absolute windows (tokens, capped at the prefix length) of the window curves.
WINDOW_POINTS = (16, 64, 256, 1024)
WINDOW_KINDS = ("local", "special+local")
# Shares of a probe's attention mass at which the funnel counts keys; the layer's figure is at 0.9.
FUNNEL_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.99)
FUNNEL_LEVEL = 0.9

RECENT_PROBES = 32
SAMPLED_PROBES = 32
FIRST_SAMPLED_POSITION = 16
PROBE_SCHEME = (
    f"last {RECENT_PROBES} queries + {SAMPLED_PROBES} sampled without replacement from positions "
    f"[{FIRST_SAMPLED_POSITION}, n-{RECENT_PROBES}) (torch.randperm, seed crc32 of the token ids); "
    "heavy-hitter scores: attention accumulated over all queries <= the probe"
)

COPY_NGRAM = 3
COPY_MIN_DISTANCE = 64
RETRIEVAL_SCHEME = (
    f"copy events: queries whose last {COPY_NGRAM} tokens occurred before, at least {COPY_MIN_DISTANCE} "
    "tokens back, followed by the query's next token; score: mean attention on that earlier token"
)


@dataclass(frozen=True)
class Ratios:
    """FastGen's r_l and r_f, and the attention sinks that go with 'special'."""

    local: float = 0.3
    frequency: float = 0.3
    sinks: int = DEFAULT_SINKS


DEFAULT_RATIOS = Ratios()


def budget_tokens(fraction: float, length: int) -> int:
    """round(fraction · length) tokens, at least 1 when the fraction is positive."""
    return max(1, round(fraction * length)) if fraction > 0 else 0


def fastgen_budget(length: int, ratios: Ratios) -> Budget:
    """FastGen's budgets for a prefix of `length` keys: window r_l·n, heavy hitters r_f·n."""
    return Budget(sinks=ratios.sinks, window=budget_tokens(ratios.local, length), heavy=budget_tokens(ratios.frequency, length))


def curve_budget(kind: str, fraction: float, length: int, ratios: Ratios) -> Budget:
    """The budget of a curve kind at a fraction of the prefix; the hybrid with both heavy
    hitters and a window splits it, x·n/2 each."""
    if kind == "special+punct+frequency+local":
        half = budget_tokens(fraction / 2, length)
        return Budget(sinks=ratios.sinks, window=half, heavy=half)
    tokens = budget_tokens(fraction, length)
    return Budget(sinks=ratios.sinks, window=tokens if "local" in kind else 0, heavy=tokens if "frequency" in kind else 0)


def window_budget(window: int, length: int, ratios: Ratios) -> Budget:
    """A fixed window of `window` tokens, capped at the prefix length."""
    return Budget(sinks=ratios.sinks, window=min(window, length), heavy=0)


def probe_positions(token_ids: torch.Tensor) -> torch.Tensor:
    """The probe queries of a prompt, sorted: see PROBE_SCHEME. token_ids: (n,) -> (P,) long."""
    length = token_ids.shape[-1]
    recent = torch.arange(max(0, length - RECENT_PROBES), length)
    pool = torch.arange(FIRST_SAMPLED_POSITION, max(FIRST_SAMPLED_POSITION, length - RECENT_PROBES))
    generator = torch.Generator().manual_seed(zlib.crc32(token_ids.cpu().numpy().astype("int64").tobytes()))
    sampled = pool[torch.randperm(len(pool), generator=generator)[:SAMPLED_PROBES]]
    return torch.cat([sampled, recent]).sort().values


def copy_events(token_ids: torch.Tensor) -> torch.Tensor:
    """(E, 2) long (query, source) pairs of a prompt: see the module docstring. token_ids: (n,)."""
    ids = token_ids.tolist()
    latest: dict[tuple[int, ...], int] = {}  # each n-gram's latest end position
    events = []
    for query in range(COPY_NGRAM - 1, len(ids) - 1):
        ngram = tuple(ids[query - COPY_NGRAM + 1:query + 1])
        end = latest.get(ngram)
        if end is not None and ids[end + 1] == ids[query + 1] and query - (end + 1) >= COPY_MIN_DISTANCE:
            events.append((query, end + 1))
        latest[ngram] = query
    return torch.tensor(events, dtype=torch.long).view(-1, 2)


@dataclass
class LayerStatistics:
    """A layer's measurements summed over probe queries (float64, CPU); divide by `probes`.

    Query-head tensors have `heads` rows, KV-head tensors `kv_heads` rows (already the mean
    over the query group); columns follow FASTGEN_POLICIES, CURVE_KINDS × CURVE_POINTS,
    WINDOW_KINDS × WINDOW_POINTS and FUNNEL_LEVELS."""

    probes: int
    query_fastgen: torch.Tensor  # (heads, policies)
    kv_fastgen: torch.Tensor  # (kv_heads, policies)
    curves: torch.Tensor  # (kv_heads, curve kinds, curve points)
    window_curves: torch.Tensor  # (kv_heads, window kinds, window points)
    sink_mass: torch.Tensor  # (heads,)
    funnel: torch.Tensor  # (heads, levels): key fractions
    special_fraction: float
    punct_fraction: float
    copy_events: int = 0
    copy_mass: torch.Tensor | None = None  # (heads,) attention on the sources, summed over copy events

    def __add__(self, other: LayerStatistics) -> LayerStatistics:
        return LayerStatistics(
            probes=self.probes + other.probes,
            query_fastgen=self.query_fastgen + other.query_fastgen,
            kv_fastgen=self.kv_fastgen + other.kv_fastgen,
            curves=self.curves + other.curves,
            window_curves=self.window_curves + other.window_curves,
            sink_mass=self.sink_mass + other.sink_mass,
            funnel=self.funnel + other.funnel,
            special_fraction=self.special_fraction + other.special_fraction,
            punct_fraction=self.punct_fraction + other.punct_fraction,
            copy_events=self.copy_events + other.copy_events,
            copy_mass=_sum_present(self.copy_mass, other.copy_mass),
        )


def _sum_present(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """first + second, where a missing one (None) counts as nothing."""
    if first is None or second is None:
        return second if first is None else first
    return first + second
