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
Where the full cache answered the same prompts its mean stands beside the two, and a lead whose
trailing method scores as well as the full cache or better says so: compression keeps at most what
the cache it compresses holds, so such a lead comes from answers unlike the model's own (a small
model that recites filler where it cannot do the task, answering otherwise once the filler is
evicted), not from what the leader kept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from kvc.eval.records import Record, Results
from kvc.eval.settings import LOWER_IS_BETTER, PUBLISHED

KVC = "kvc"
FULL = "full"
MIN_PROMPTS = 10
DRAWS = 10_000
LEVEL = 0.95
TIE = 1e-9  # means closer than this are level (the same scores summed in another order)
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
    full: float | None = None  # the full cache's mean over the same prompts; None where it did not answer them all

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
            return "kvc ahead" + self.beyond_full(trailing=self.other)
        if better_high < 0:
            return f"{self.baseline} ahead" + self.beyond_full(trailing=self.kvc)
        return "within noise"

    def beyond_full(self, trailing: float) -> str:
        """What a lead adds when the full cache scores no better than the one behind: all of the lead lies beyond it."""
        if self.full is None:
            return ""
        shortfall = (self.full - trailing) if self.higher_is_better else (trailing - self.full)
        return "" if shortfall > TIE else ", the full cache no better than either"

    def to_dict(self) -> dict:
        return asdict(self) | {"higher_is_better": self.higher_is_better, "verdict": self.verdict}


def measures(record: Record) -> dict[str, float]:
    """The values a record is compared by: its score, and a fidelity record's first differing token and new loop."""
    values = {record.task: record.score}
    if record.task == "fidelity" and record.metrics:
        values |= {measure: float(record.metrics[measure.removeprefix("fidelity_")]) for measure in FIDELITY_MEASURES}
    return values


def higher_is_better(measure: str) -> bool:
    return FIDELITY_MEASURES[measure] if measure in FIDELITY_MEASURES else measure not in LOWER_IS_BETTER


def comparisons(results: Results, rivals: tuple[str, ...] = PUBLISHED) -> list[Comparison]:
    """One comparison per setting, budget and measure where kvc and at least one of `rivals` (the published
    baselines, or e.g. a variant of kvc's plan) share prompts."""
    values = defaultdict(dict)  # (setting, budget, measure, method) -> {prompt: value}
    for record in results.records:
        if record.method not in (KVC, FULL, *rivals):
            continue
        prompt = (record.length, record.depth, record.sample)
        for measure, value in measures(record).items():
            values[(record.setting, record.budget, measure, record.method)][prompt] = value
    found = []
    for (setting, budget, measure, method), mine in values.items():
        if method != KVC:
            continue
        shared = {name: sorted(set(mine) & set(values[(setting, budget, measure, name)]), key=str)
                  for name in rivals if (setting, budget, measure, name) in values}
        shared = {name: prompts for name, prompts in shared.items() if prompts}
        if not shared:
            continue
        sign = 1 if higher_is_better(measure) else -1
        name = max(shared, key=lambda n: sign * column(values[(setting, budget, measure, n)], shared[n]).mean())
        prompts, full = shared[name], values.get((setting, 1.0, measure, FULL), {})
        found.append(compare(setting, budget, measure, name, column(mine, prompts),
                             column(values[(setting, budget, measure, name)], prompts),
                             float(column(full, prompts).mean()) if set(prompts) <= set(full) else None))
    return sorted(found, key=lambda c: (str(c.setting), c.budget, c.measure))


def column(values: dict, prompts: list) -> np.ndarray:
    """The values of these prompts, in their order."""
    return np.array([values[prompt] for prompt in prompts], float)


def compare(setting, budget, measure, baseline, ours: np.ndarray, theirs: np.ndarray, full: float | None = None
            ) -> Comparison:
    differences = ours - theirs
    low = high = None
    if len(differences) >= MIN_PROMPTS:
        low, high = bootstrap_interval(differences)
    better = differences if higher_is_better(measure) else -differences
    return Comparison(setting, budget, measure, baseline, len(differences), float(ours.mean()), float(theirs.mean()),
                      float(differences.mean()), low, high, int((better > 0).sum()), int((better < 0).sum()), full)


def bootstrap_interval(differences: np.ndarray, draws: int = DRAWS, level: float = LEVEL, seed: int = 0
                       ) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean: the prompts drawn again with replacement `draws` times."""
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (draws, len(differences)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
