"""The evaluation harness: tasks x methods x budgets x lengths x depths x settings, every sample through kvc's runtime.

Questions (passkey, needle, the RULER-style tasks, generation fidelity) are a context and a question,
asked with the question in the compressed prompt (query-aware) or after it (query-agnostic); the
context is prefilled once per sample and setting for every method (`questions.answer_all`), whose
answers are then decoded greedily each through its own cache. Perplexity is teacher-forced,
the prefix prefilled into the method's cache and the continuation fed one token per step, and
recovery measures the full model's attention mass on what the cache holds at those steps. Each
(task, length) gets one max length (its longest prompt plus the new tokens), the budgets are
shares of the full cache's bytes there, and `full` runs once as the reference (budget 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from kvc.eval import ruler
from kvc.eval.baselines import full_bytes, method_plan
from kvc.eval.fidelity import ANSWER_TOKENS as FIDELITY_ANSWER_TOKENS
from kvc.eval.fidelity import fidelity_metrics, fidelity_sample
from kvc.eval.niah import ANSWER_TOKENS as NEEDLE_ANSWER_TOKENS
from kvc.eval.niah import needle_sample, needle_score
from kvc.eval.passkey import ANSWER_TOKENS as PASSKEY_ANSWER_TOKENS
from kvc.eval.passkey import passkey_correct, passkey_sample
from kvc.eval.perplexity import perplexity, perplexity_sample, teacher_forced
from kvc.eval.questions import Prompt, answer_all
from kvc.eval.records import Record, Results, cell_key
from kvc.eval.recovery import attention_recovery
from kvc.eval.settings import Settings, check_backend
from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.policies.schema import Policy


@dataclass(frozen=True)
class Sample:
    depth: float | None
    num_tokens: int  # prompt (or prefix) tokens
    payload: object  # the Prompt (context and question), or a PerplexitySample
    score: Callable[[str], float] | None = None
    index: int = 0  # the sample's number: its seed, first essay of the haystack or passage back from the end


@dataclass(frozen=True)
class Outcome:
    score: float
    completion: str
    cache_bytes: int
    metrics: dict | None = None


@dataclass(frozen=True)
class Task:
    samples: Callable[[object, int, list[float], Settings], list[Sample]]
    run: Callable[[LoadedModel, Plan, Sample, int], Outcome] | None = None  # None: a question, asked by `ask`
    higher_is_better: bool = True
    answer_tokens: int = 0  # tokens decoded after the prompt; 0: teacher-forced, the continuation's
    compares: bool = False  # scored against the full cache's answer (generation fidelity)

    @property
    def asks(self) -> bool:
        """A context and a question: evaluated in the query-aware and query-agnostic settings."""
        return self.run is None


def sample_numbers(settings: Settings) -> range:
    return range(settings.first_sample, settings.first_sample + settings.samples)


def question_sample(tokenizer, built, depth, index: int, answers: Callable[[str], float]) -> Sample:
    """A task sample (with context and question) as the harness's: its prompt and its scorer."""
    prompt = Prompt.encode(tokenizer, built.context, built.question)
    return Sample(depth, prompt.num_tokens, prompt, answers, index)


def passkey_samples(tokenizer, length, depths, settings) -> list[Sample]:
    """Sample i: the key of seed i, at every depth."""
    samples = [(index, passkey_sample(tokenizer, length, depth, seed=index))
               for index in sample_numbers(settings) for depth in depths]
    return [question_sample(tokenizer, s, s.depth, index, lambda text, s=s: float(passkey_correct(s, text)))
            for index, s in samples]


def needle_samples(tokenizer, length, depths, settings) -> list[Sample]:
    """Sample i: the haystack that starts at essay i, at every depth."""
    samples = [(index, needle_sample(tokenizer, length, depth, haystack=index))
               for index in sample_numbers(settings) for depth in depths]
    return [question_sample(tokenizer, s, s.depth, index, needle_score) for index, s in samples]


def ruler_samples(name: str) -> Callable[..., list[Sample]]:
    """Sample i of a RULER-style task: the seed i (no depths: positions are drawn from the seed)."""
    def build(tokenizer, length, depths, settings) -> list[Sample]:
        samples = [(index, ruler.GENERATORS[name](tokenizer, length, seed=index)) for index in sample_numbers(settings)]
        return [question_sample(tokenizer, s, None, index, partial(ruler.share_found, s.answers))
                for index, s in samples]

    return build


def fidelity_samples(tokenizer, length, depths, settings) -> list[Sample]:
    """Sample i: essays from the middle of the collection on, then request i."""
    return [question_sample(tokenizer, fidelity_sample(tokenizer, length, index), None, index, None)
            for index in sample_numbers(settings)]


def perplexity_samples(tokenizer, length, depths, settings) -> list[Sample]:
    """Sample i: the i-th passage back from the end of the essays."""
    samples = [(index, perplexity_sample(tokenizer, length, settings.continuation, offset=index))
               for index in sample_numbers(settings)]
    return [Sample(None, len(sample.prefix_ids), sample, index=index) for index, sample in samples]


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


TASKS: dict[str, Task] = {
    "passkey": Task(passkey_samples, answer_tokens=PASSKEY_ANSWER_TOKENS),
    "niah": Task(needle_samples, answer_tokens=NEEDLE_ANSWER_TOKENS),
    **{name: Task(ruler_samples(name), answer_tokens=tokens) for name, tokens in ruler.ANSWER_TOKENS.items()},
    "fidelity": Task(fidelity_samples, answer_tokens=FIDELITY_ANSWER_TOKENS, compares=True),
    "ppl": Task(perplexity_samples, run_perplexity, higher_is_better=False),
    "recovery": Task(perplexity_samples, run_recovery),
}


def new_tokens(task: str, settings: Settings) -> int:
    """Tokens after the prompt: the answer's (the task's own unless the settings say), or the
    teacher-forced continuation's."""
    own = TASKS[task].answer_tokens
    if TASKS[task].compares:
        return own  # fidelity: always its own long answer
    return settings.continuation if not own else settings.answer_tokens or own


@dataclass(frozen=True)
class Member:
    """One method at one budget in a (task, length) group: its plan."""

    method: str
    budget: float
    plan: Plan


@dataclass(frozen=True)
class Group:
    task: str
    length: int
    max_len: int
    members: list[Member]
    samples: list[Sample]


def evaluate(loaded: LoadedModel, settings: Settings, policy: Policy | None = None, plan: Plan | None = None,
             show_progress: bool = True, done: dict | None = None, seconds: float = 0.0,
             on_record: Callable[[Results], None] | None = None) -> Results:
    """Run every (task, length, sample, setting, method, budget); `plan`, when given, is the `kvc` method's plan.

    A question's context is prefilled once per sample and setting for every method (`ask`). `done`
    holds records of an earlier run by their cell (`Record.cell`): those cells are taken from it,
    not run again, and `seconds` is what that run took. `on_record` sees the results after each new
    record, their `seconds` up to date; a run that computes nothing new adds no seconds."""
    began = time.perf_counter()
    results = Results(settings, seconds=seconds)
    done = done or {}
    for task in settings.tasks:
        check_backend(task, settings.backend)
    if any(TASKS[task].compares for task in settings.tasks) and "full" not in settings.methods:
        raise KvcError("--tasks fidelity compares every answer with the full cache's: add full to --methods")
    groups = []
    for task in settings.tasks:
        for length in settings.lengths:
            samples = TASKS[task].samples(loaded.tokenizer, length, settings.depths, settings)
            max_len = max(sample.num_tokens for sample in samples) + new_tokens(task, settings)
            members = [Member(method, budget, given_plan(loaded, plan, max_len, budget, settings.dtype)
                              if method == "kvc" and plan else
                              method_plan(method, loaded, policy, max_len, budget, settings.dtype))
                       for method in settings.methods for budget in ([1.0] if method == "full" else settings.budgets)]
            groups.append(Group(task, length, max_len, members, samples))
    total = sum(len(group.samples) * len(group.members) * len(settings_of(group.task, settings)) for group in groups)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("eval", total=total)
        for group in groups:
            for sample in group.samples:
                for setting in settings_of(group.task, settings):
                    progress.update(bar, description=f"{group.task} {group.length} {setting or ''} sample {sample.index}")
                    for record in records_of(loaded, settings, group, sample, setting, done):
                        results.records.append(record)
                        if record.cell() not in done:  # the run's time: up to its last new record
                            results.seconds = seconds + time.perf_counter() - began
                            if on_record is not None:
                                on_record(results)
                        progress.advance(bar)
    return results


def settings_of(task: str, settings: Settings) -> list[str | None]:
    return list(settings.setting) if TASKS[task].asks else [None]


def records_of(loaded, settings, group: Group, sample: Sample, setting, done: dict) -> Iterator[Record]:
    """The group's records of one sample in one setting: earlier ones from `done`, the rest computed."""
    task = TASKS[group.task]
    cells = [cell_key(group.task, m.method, m.budget, group.length, sample.depth, sample.index, setting)
             for m in group.members]
    missing = [member for member, cell in zip(group.members, cells) if cell not in done]
    answered = iter(ask(loaded, settings, group, sample, setting, missing) if task.asks and missing else [])
    full_bytes_here = full_bytes(loaded, group.max_len, settings.dtype)
    for member, cell in zip(group.members, cells):
        if cell in done:
            yield done[cell]
            continue
        outcome = next(answered) if task.asks else task.run(loaded, member.plan, sample,
                                                             new_tokens(group.task, settings))
        yield Record(group.task, member.method, member.budget, group.length, sample.depth, outcome.score,
                     outcome.cache_bytes, full_bytes_here, group.max_len, outcome.completion, sample.index, setting,
                     outcome.metrics)


def ask(loaded, settings, group: Group, sample: Sample, setting: str, members: list[Member]) -> list[Outcome]:
    """The members' answers to the sample's question after one shared prefill; a comparing task's
    are scored against the full cache's answer (computed again when its record is done)."""
    task = TASKS[group.task]
    plans = [member.plan for member in members]
    reference = next((m for m in group.members if m.method == "full"), None) if task.compares else None
    position = next((i for i, member in enumerate(members) if member is reference), None)
    extra = [reference.plan] if reference is not None and position is None else []
    if settings.backend == "onnxruntime":
        from kvc.export.cached import exported_generator
        from kvc.eval.exported import answer_exported

        answers = [answer_exported(exported_generator(loaded, plan), sample.payload, setting,
                                   new_tokens(group.task, settings)) for plan in plans + extra]
    else:
        probed = [member.method.startswith("kvc") for member in members] + [False] * len(extra)  # baselines: as published
        answers = answer_all(loaded, plans + extra, sample.payload, setting, new_tokens(group.task, settings),
                             probe=settings.context_probe, probed=probed)
    texts = [loaded.tokenizer.decode(answer.tokens, skip_special_tokens=True) for answer in answers]
    if reference is None:
        return [Outcome(sample.score(text), text, answer.cache_bytes) for answer, text in zip(answers, texts)]
    expected = answers[-1 if extra else position].tokens
    metrics = [fidelity_metrics(answer.tokens, expected) for answer in answers[:len(members)]]
    return [Outcome(scores["identical"], text, answer.cache_bytes, scores)
            for answer, text, scores in zip(answers, texts, metrics)]


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
