"""kvc against the best published baseline, prompt by prompt: is a difference more than the samples' noise?

Every method of an evaluation answers the same prompts (one sample of one task at one length and
depth), so kvc's score and a baseline's on the same prompt are a pair. Per setting, budget and
measure (each task's score; for generation fidelity also the first differing token and whether
the answer loops where the full cache's does not), kvc's
opponent is the published baseline with the best mean over the prompts both answered; the mean of
the paired differences (kvc minus the baseline) gets a 95% bootstrap interval, the prompts drawn
again with replacement (seeded: the same records give the same interval). An interval clear of
zero says who leads; one across zero says these prompts cannot tell, however the means look (unless
the two score the same on every prompt, which is said as such). Below
MIN_PROMPTS prompts no interval is drawn: a bootstrap over a handful is narrower than the truth.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from kvc.eval.baselines import PUBLISHED
from kvc.eval.harness import TASKS, Record, Results

KVC = "kvc"
MIN_PROMPTS = 10
DRAWS = 10_000
LEVEL = 0.95
FIRST_DIFFERENCE = "fidelity_first_difference"  # the summary's column names for a fidelity record's metrics
NEW_LOOP = "fidelity_new_loop"
# a fidelity record's metrics compared beside its score, and whether more is better
FIDELITY_MEASURES = {FIRST_DIFFERENCE: True, NEW_LOOP: False}


@dataclass(frozen=True)
class Comparison:
    """kvc against its strongest baseline on one setting, budget and measure, over the prompts both answered."""

    setting: str | None  # None: a task without a question (ppl, recovery)
    budget: float
    measure: str
    baseline: str
    prompts: int
    kvc: float  # means over the paired prompts
    other: float
    difference: float  # kvc minus the baseline
    low: float | None  # the 95% bootstrap interval of the difference; None below MIN_PROMPTS prompts
    high: float | None
    ahead: int  # prompts on which kvc is better by the measure's direction, and worse
    behind: int

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.measure)

    @property
    def verdict(self) -> str:
        if self.low is None:
            return f"fewer than {MIN_PROMPTS} prompts"
        if self.ahead == self.behind == 0:
            return "level on every prompt"
        better_low, better_high = (self.low, self.high) if self.higher_is_better else (-self.high, -self.low)
        if better_low > 0:
            return "kvc ahead"
        if better_high < 0:
            return f"{self.baseline} ahead"
        return "within noise"

    def to_dict(self) -> dict:
        return asdict(self) | {"higher_is_better": self.higher_is_better, "verdict": self.verdict}


def measures(record: Record) -> dict[str, float]:
    """The values a record is compared by: its score, and a fidelity record's first differing token and new loop."""
    values = {record.task: record.score}
    if record.task == "fidelity" and record.metrics:
        values |= {measure: float(record.metrics[measure.removeprefix("fidelity_")]) for measure in FIDELITY_MEASURES}
    return values


def higher_is_better(measure: str) -> bool:
    return FIDELITY_MEASURES[measure] if measure in FIDELITY_MEASURES else TASKS[measure].higher_is_better


def comparisons(results: Results) -> list[Comparison]:
    """One comparison per setting, budget and measure where kvc and at least one published baseline share prompts."""
    values = defaultdict(dict)  # (setting, budget, measure, method) -> {prompt: value}
    for record in results.records:
        if record.method != KVC and record.method not in PUBLISHED:
            continue
        prompt = (record.length, record.depth, record.sample)
        for measure, value in measures(record).items():
            values[(record.setting, record.budget, measure, record.method)][prompt] = value
    found = []
    for (setting, budget, measure, method), mine in values.items():
        if method != KVC:
            continue
        rivals = [(name, values[(setting, budget, measure, name)]) for name in PUBLISHED
                  if (setting, budget, measure, name) in values]
        pairs = {name: paired(mine, theirs) for name, theirs in rivals}
        pairs = {name: pair for name, pair in pairs.items() if len(pair[0])}
        if not pairs:
            continue
        sign = 1 if higher_is_better(measure) else -1
        name, (ours, theirs) = max(pairs.items(), key=lambda item: sign * item[1][1].mean())
        found.append(compare(setting, budget, measure, name, ours, theirs))
    return sorted(found, key=lambda c: (str(c.setting), c.budget, c.measure))


def paired(mine: dict, theirs: dict) -> tuple[np.ndarray, np.ndarray]:
    prompts = sorted(set(mine) & set(theirs), key=str)
    return np.array([mine[p] for p in prompts], float), np.array([theirs[p] for p in prompts], float)


def compare(setting, budget, measure, baseline, ours: np.ndarray, theirs: np.ndarray) -> Comparison:
    differences = ours - theirs
    low = high = None
    if len(differences) >= MIN_PROMPTS:
        low, high = bootstrap_interval(differences)
    better = differences if higher_is_better(measure) else -differences
    return Comparison(setting, budget, measure, baseline, len(differences), float(ours.mean()), float(theirs.mean()),
                      float(differences.mean()), low, high, int((better > 0).sum()), int((better < 0).sum()))


def bootstrap_interval(differences: np.ndarray, draws: int = DRAWS, level: float = LEVEL, seed: int = 0
                       ) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean: the prompts drawn again with replacement `draws` times."""
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (draws, len(differences)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
