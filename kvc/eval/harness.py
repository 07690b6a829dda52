"""The evaluation harness: tasks x methods x budgets x lengths x depths, every sample through kvc's runtime.

Passkey and needle prompts are continued greedily by `generate`; perplexity is teacher-forced,
the prefix prefilled into the method's cache and the continuation fed one token per step, and
recovery measures the full model's attention mass on what the cache holds at those steps. Each
(task, length) gets one max length (its longest prompt plus the new tokens), the budgets are
shares of the full cache's bytes there, and `full` runs once as the reference (budget 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from kvc.eval.baselines import full_bytes, method_plan
from kvc.eval.niah import ANSWER_TOKENS as NEEDLE_ANSWER_TOKENS
from kvc.eval.niah import needle_sample, needle_score
from kvc.eval.passkey import ANSWER_TOKENS as PASSKEY_ANSWER_TOKENS
from kvc.eval.passkey import passkey_correct, passkey_sample
from kvc.eval.perplexity import perplexity, perplexity_sample, teacher_forced
from kvc.eval.recovery import attention_recovery
from kvc.eval.settings import Settings
from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.policies.schema import Policy
from kvc.runtime.generate import generate


@dataclass(frozen=True)
class Sample:
    depth: float | None
    num_tokens: int  # prompt (or prefix) tokens
    payload: object  # the prompt text, or a PerplexitySample
    score: Callable[[str], float] | None = None
    index: int = 0  # the sample's number: passkey seed, first essay of the haystack or passage back from the end


@dataclass(frozen=True)
class Outcome:
    score: float
    completion: str
    cache_bytes: int


@dataclass(frozen=True)
class Task:
    samples: Callable[[object, int, list[float], Settings], list[Sample]]
    run: Callable[[LoadedModel, Plan, Sample, int], Outcome]
    higher_is_better: bool = True
    answer_tokens: int = 0  # tokens decoded after the prompt; 0: teacher-forced, the continuation's


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

    def cell(self) -> tuple:
        return cell_key(self.task, self.method, self.budget, self.length, self.depth, self.sample)


def cell_key(task: str, method: str, budget: float, length: int, depth: float | None, sample: int) -> tuple:
    """What a record is the score of: one sample of one task, method, budget, length and depth."""
    return (task, method, float(budget), int(length), None if depth is None else float(depth), int(sample))


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
        return cls(Settings(**settings), [Record(**record) for record in data["records"]], data["seconds"])


def sample_numbers(settings: Settings) -> range:
    return range(settings.first_sample, settings.first_sample + settings.samples)


def passkey_samples(tokenizer, length, depths, settings) -> list[Sample]:
    """Sample i: the key of seed i, at every depth."""
    samples = [(index, passkey_sample(tokenizer, length, depth, seed=index))
               for index in sample_numbers(settings) for depth in depths]
    return [Sample(s.depth, s.num_tokens, s.text, lambda text, s=s: float(passkey_correct(s, text)), index)
            for index, s in samples]


def needle_samples(tokenizer, length, depths, settings) -> list[Sample]:
    """Sample i: the haystack that starts at essay i, at every depth."""
    samples = [(index, needle_sample(tokenizer, length, depth, haystack=index))
               for index in sample_numbers(settings) for depth in depths]
    return [Sample(s.depth, s.num_tokens, s.text, needle_score, index) for index, s in samples]


def perplexity_samples(tokenizer, length, depths, settings) -> list[Sample]:
    """Sample i: the i-th passage back from the end of the essays."""
    samples = [(index, perplexity_sample(tokenizer, length, settings.continuation, offset=index))
               for index in sample_numbers(settings)]
    return [Sample(None, len(sample.prefix_ids), sample, index=index) for index, sample in samples]


def run_generation(loaded: LoadedModel, plan: Plan, sample: Sample, new_tokens: int) -> Outcome:
    result = generate(loaded, sample.payload, plan, max_new_tokens=new_tokens)
    return Outcome(sample.score(result.texts[0]), result.texts[0], result.cache_bytes)


def run_generation_onnx(loaded: LoadedModel, plan: Plan, sample: Sample, new_tokens: int) -> Outcome:
    """The same prompt through the plan's exported graphs in onnxruntime (exported once, then cached)."""
    from kvc.export.cached import exported_generator

    result = exported_generator(loaded, plan).generate(sample.payload, max_new_tokens=new_tokens)
    return Outcome(sample.score(result.texts[0]), result.texts[0], result.cache_bytes)


def run_perplexity(loaded: LoadedModel, plan: Plan, sample: Sample, new_tokens: int) -> Outcome:
    """Teacher-forced perplexity of the continuation, one decode step per token through the plan's cache."""
    text, nll = sample.payload, []
    with closing(teacher_forced(loaded, plan, text)) as steps:
        for target, (logits, cache) in zip(text.continuation_ids, steps):  # the last token is never fed
            nll.append(float(-torch.log_softmax(logits.float(), dim=-1)[target]))
        return Outcome(perplexity(nll), "", cache.nbytes())


def run_recovery(loaded: LoadedModel, plan: Plan, sample: Sample, new_tokens: int) -> Outcome:
    score, nbytes = attention_recovery(loaded, plan, sample.payload)
    return Outcome(score, "", nbytes)


BACKENDS = ("torch", "onnxruntime")
ONNX_RUNS = {"passkey": run_generation_onnx, "niah": run_generation_onnx}  # the tasks onnxruntime runs


def task_runner(task: str, backend: str) -> Callable:
    """What runs one sample of a task on a backend: kvc's torch runtime, or the exported graphs."""
    if backend not in BACKENDS:
        raise KvcError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return TASKS[task].run
    if task not in ONNX_RUNS:
        raise KvcError(f"--backend onnxruntime runs the tasks {', '.join(ONNX_RUNS)}, not {task}")
    return ONNX_RUNS[task]


TASKS: dict[str, Task] = {
    "passkey": Task(passkey_samples, run_generation, answer_tokens=PASSKEY_ANSWER_TOKENS),
    "niah": Task(needle_samples, run_generation, answer_tokens=NEEDLE_ANSWER_TOKENS),
    "ppl": Task(perplexity_samples, run_perplexity, higher_is_better=False),
    "recovery": Task(perplexity_samples, run_recovery),
}


def new_tokens(task: str, settings: Settings) -> int:
    """Tokens after the prompt: the answer's (the task's own unless the settings say), or the
    teacher-forced continuation's."""
    own = TASKS[task].answer_tokens
    return settings.continuation if not own else settings.answer_tokens or own


def evaluate(loaded: LoadedModel, settings: Settings, policy: Policy | None = None, plan: Plan | None = None,
             show_progress: bool = True, done: dict | None = None,
             on_record: Callable[[Results], None] | None = None) -> Results:
    """Run every (task, length, method, budget, sample); `plan`, when given, is the `kvc` method's plan.

    `done` holds records of an earlier run by their cell (`Record.cell`): those cells are
    taken from it, not run again. `on_record` sees the results after each new record."""
    began = time.perf_counter()
    results = Results(settings)
    done = done or {}
    work = []  # (task, length, method, budget, max_len, plan, samples)
    runners = {task: task_runner(task, settings.backend) for task in settings.tasks}
    for task in settings.tasks:
        for length in settings.lengths:
            samples = TASKS[task].samples(loaded.tokenizer, length, settings.depths, settings)
            max_len = max(sample.num_tokens for sample in samples) + new_tokens(task, settings)
            for method in settings.methods:
                for budget in [1.0] if method == "full" else settings.budgets:
                    built = given_plan(loaded, plan, max_len, budget, settings.dtype) if method == "kvc" and plan \
                        else method_plan(method, loaded, policy, max_len, budget, settings.dtype)
                    work.append((task, length, method, budget, max_len, built, samples))
    total = sum(len(item[-1]) for item in work)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("eval", total=total)
        for task, length, method, budget, max_len, built, samples in work:
            for sample in samples:
                earlier = done.get(cell_key(task, method, budget, length, sample.depth, sample.index))
                if earlier is None:
                    progress.update(bar, description=f"{task} {length} {method} {budget:g}")
                    outcome = runners[task](loaded, built, sample, new_tokens(task, settings))
                    results.records.append(Record(task, method, budget, length, sample.depth, outcome.score,
                                                  outcome.cache_bytes, full_bytes(loaded, max_len, settings.dtype),
                                                  max_len, outcome.completion, sample.index))
                    if on_record is not None:
                        on_record(results)
                else:
                    results.records.append(earlier)
                progress.advance(bar)
    results.seconds = time.perf_counter() - began
    return results


def given_plan(loaded: LoadedModel, plan: Plan, max_len: int, budget: float, dtype: str) -> Plan:
    """A user's compiled plan as the `kvc` method: it must serve max_len within the budget."""
    plan.check_length(max_len)
    allowed = int(budget * full_bytes(loaded, max_len, dtype))
    if plan.cache_bytes > allowed:
        raise KvcError(f"--plan takes {plan.cache_bytes} bytes, more than the budget {budget:g} allows at length "
                       f"{max_len} ({allowed} bytes); compile it for a smaller target or raise --budgets")
    if plan.target.dtype != dtype:
        raise KvcError(f"--plan was compiled for {plan.target.dtype}, the model runs in {dtype}")
    return plan
