"""An evaluation keeps its records on disk as it goes, and the same command resumes it.

After every sample the records so far are written (atomically) to the progress file: the --json file
when one is given, else a file in the kvc cache named after the run, removed once the run completes.
A later run reuses a record when the file was written for the same run (model fingerprint, policy
and plan, cache dtype, decoded and teacher-forced tokens, backend, context probe, CPU threads) and
the record's cell (task, method, budget, length, depth, sample, setting) is asked for again; only
the missing cells are computed. Every write keeps the earlier records the run has not reached (or
does not ask for: a run of fewer samples over a file of more), so stopping a resumed run at any
point loses none of them; `kvc eval` refuses a --json file of another run rather than replace
its records (`differences` says what differs). The thread count is part of the run because it sets
the order of the sums: on the embedded model the full cache's greedy answer to 2 of 10 fidelity
prompts differs between one thread and two (docs/results.md, stop 39).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvc import __version__
from kvc.eval import report
from kvc.eval.records import Record, Results, read_record
from kvc.models import cache_folder


def run_identity(fingerprint: str, settings, policy_text: str | None, plan_bytes: bytes | None) -> dict:
    """What must match for an earlier record to stand for this run's."""
    digest = lambda data: None if data is None else hashlib.sha256(data).hexdigest()[:16]  # noqa: E731
    return {"kvc": __version__, "model": fingerprint, "policy": digest(policy_text and policy_text.encode()),
            "plan": digest(plan_bytes), "dtype": settings.dtype, "answer_tokens": settings.answer_tokens,
            "continuation": settings.continuation, "backend": settings.backend,
            "context_probe": settings.context_probe, "threads": torch.get_num_threads()}


@dataclass
class Progress:
    path: Path
    identity: dict
    temporary: bool  # a file of the cache, removed when the run completes
    kept: dict[tuple, Record] = field(default_factory=dict)  # the earlier run's records, by cell

    @classmethod
    def for_run(cls, json_out: Path | None, identity: dict, settings) -> Progress:
        if json_out is not None:
            return cls(Path(json_out), identity, temporary=False)
        name = hashlib.sha256(json.dumps([identity, asdict(settings)], sort_keys=True, default=str).encode())
        return cls(cache_folder("eval") / f"run-{name.hexdigest()[:16]}.json", identity, temporary=True)

    # What a progress file that cannot be read, or holds something else, raises while it is read
    UNREADABLE = (OSError, ValueError, TypeError, KeyError, AttributeError)

    def _written(self) -> dict:
        """The file's contents; raises one of UNREADABLE when there is none to read."""
        return json.loads(self.path.read_text(encoding="utf-8"))

    def earlier(self) -> tuple[dict[tuple, Record], float]:
        """Records of an earlier run of the same identity, by cell, and the seconds it took."""
        try:
            data = self._written()
            if data.get("run") != self.identity:
                return {}, 0.0
            records = [read_record(record) for record in data["records"]]
            self.kept = {record.cell(): record for record in records}
            return dict(self.kept), float(data.get("seconds", 0.0))
        except self.UNREADABLE:
            return {}, 0.0  # nothing readable to resume from: start afresh

    def differences(self) -> list[str]:
        """What differs between this run and the earlier run the file holds ("threads 2, now 1"); none
        when the file holds this run, none readable, or no file."""
        try:
            earlier = self._written()["run"]
            return [f"{key} {earlier.get(key)}, now {value}" for key, value in self.identity.items()
                    if earlier.get(key) != value]
        except self.UNREADABLE:
            return []

    def save(self, results: Results, complete: bool = False) -> None:
        """The run's records so far, then the earlier ones it has not reached."""
        reached = {record.cell() for record in results.records}
        unreached = [record for cell, record in self.kept.items() if cell not in reached]
        report.write_json(Results(results.settings, results.records + unreached, results.seconds), self.path,
                          run=self.identity, complete=complete)

    def finish(self, results: Results) -> None:
        """The run completed: the --json file gets the whole result, a cache file goes."""
        if self.temporary:
            self.path.unlink(missing_ok=True)
        else:
            self.save(results, complete=True)

    def where(self) -> str:
        if not self.path.is_file():
            return "no record was finished"
        return f"the results so far are in {self.path}; the same command resumes the run"
