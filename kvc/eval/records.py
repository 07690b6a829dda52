"""An evaluation's records and results as `kvc eval` writes them to JSON and reads them back.

Torch-free, so reports and their paired comparisons (`kvc.eval.report`, `kvc.eval.paired`,
`benchmarks/paired_results.py`) read and render results without loading a model's libraries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kvc.eval.settings import SETTINGS, UNASKED_TASKS, Settings


@dataclass
class Record:
    task: str
    method: str
    budget: float
    length: int
    depth: float | None
    score: float
    cache_bytes: int
    full_bytes: int
    max_len: int
    completion: str
    sample: int = 0
    setting: str | None = None  # query-aware or query-agnostic; None: a task without a question
    metrics: dict | None = None  # generation fidelity: first_difference, identical, repetition, new_loop

    def cell(self) -> tuple:
        return cell_key(self.task, self.method, self.budget, self.length, self.depth, self.sample, self.setting)


def cell_key(task: str, method: str, budget: float, length: int, depth: float | None, sample: int,
             setting: str | None = None) -> tuple:
    """What a record is the score of: one sample of one task, method, budget, length, depth and setting."""
    return (task, method, float(budget), int(length), None if depth is None else float(depth), int(sample), setting)


@dataclass
class Results:
    settings: Settings
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "seconds": round(self.seconds, 1),
                "records": [asdict(record) for record in self.records]}

    @classmethod
    def from_dict(cls, data: dict) -> Results:
        """Results read back from `to_dict` (the JSON report), to render or plot them again."""
        settings = dict(data["settings"])
        settings.setdefault("first_sample", settings.pop("seed", 0))  # reports written before --first-sample
        settings.setdefault("setting", [SETTINGS[0]])  # ... and before the query-agnostic setting (query-aware)
        settings.setdefault("context_probe", "window")  # ... and before probes
        return cls(Settings(**settings), [read_record(record) for record in data["records"]], data["seconds"])


def read_record(data: dict) -> Record:
    """A record from JSON; one written before settings existed was asked query-aware, if it asked at all."""
    if "setting" not in data and data["task"] not in UNASKED_TASKS:
        data = data | {"setting": SETTINGS[0]}
    return Record(**data)
