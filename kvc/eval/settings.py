"""What one evaluation runs, parsed from the command line's comma-separated lists and checked.

Unknown task or method names are refused with the close matches; budgets must lie in (0, 1],
depths in [0, 1] (nan in neither), lengths be positive and within the model's limit; no list may be
empty. Every refusal is one `KvcError` naming the option.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from kvc.policies.errors import KvcError
from kvc.policies.probes import DEFAULT_PROBE


# The tasks `kvc eval` runs (`kvc.eval.harness.TASKS` holds them, in this order), the methods it compares
# (`kvc.eval.baselines.METHODS`, in this order) and the back-ends it runs them in: named here, torch-free,
# so the CLI refuses a wrong name before any model or library loads.
TASK_NAMES = ("passkey", "niah", "multikey", "multivalue", "vartrack", "fwe", "fidelity", "ppl", "recovery")
METHOD_NAMES = ("kvc", "kvc-drop", "kvc-plain", "kvc-4bit", "kvc-merge", "kvc-knapsack", "kvc-fastgen", "full",
                "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv")
PUBLISHED = ("streamingllm", "h2o", "snapkv", "pyramidkv", "adakv")  # the methods of other papers kvc is held against
UNASKED_TASKS = ("ppl", "recovery")  # teacher-forced over a passage: no question, no setting
LOWER_IS_BETTER = ("ppl",)
BACKENDS = ("torch", "onnxruntime")
ONNX_TASKS = ("passkey", "niah")  # the tasks the exported graphs run
SETTINGS = ("query-aware", "query-agnostic")  # where a question is asked: before compression, or after it


@dataclass
class Settings:
    tasks: list[str]
    methods: list[str]
    budgets: list[float]
    lengths: list[int]
    depths: list[float]
    answer_tokens: int | None = None  # decoded after passkey and needle prompts; None: each task's own
    continuation: int = 32  # teacher-forced tokens after the perplexity prefix
    samples: int = 1  # per task, length and depth: passkey seeds, needle haystacks, perplexity passages
    first_sample: int = 0  # samples first_sample .. first_sample + samples - 1 of each task
    dtype: str = "bfloat16"  # the cache's: budgets are shares of a full cache in it; the model computes in float32
    model: str = ""
    policy: str | None = None
    plan: str | None = None
    setting: list[str] = field(default_factory=lambda: list(SETTINGS))  # where questions are asked
    backend: str = "torch"  # or "onnxruntime": passkey and needle through the exported graphs
    context_probe: str = DEFAULT_PROBE  # what scores kvc's frequency heads query-agnostic (`kvc.runtime.probe`)


def items(text: str, option: str) -> list[str]:
    values = [item.strip() for item in str(text).split(",") if item.strip()]
    if not values:
        raise KvcError(f"{option}: give at least one value")
    return values


def names(text: str, known, option: str) -> list[str]:
    values = items(text, option)
    for value in values:
        if value not in known:
            close = difflib.get_close_matches(value, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise KvcError(f"{option}: unknown name {value!r} (expected some of {', '.join(known)}){hint}")
    return list(dict.fromkeys(values))


def numbers(text: str, option: str, convert, low: float, high: float, low_open: bool) -> list:
    values = []
    for item in items(text, option):
        try:
            value = convert(item)
        except ValueError:
            raise KvcError(f"{option}: {item!r} is not a number") from None
        if value != value:  # nan: no comparison refuses it
            raise KvcError(f"{option}: {item!r} is not a number")
        if not low <= value <= high or (low_open and value == low):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise KvcError(f"{option}: {item} is outside {bounds}")
        values.append(value)
    return list(dict.fromkeys(values))


def question_settings(text: str) -> list[str]:
    """--setting: query-aware, query-agnostic or both."""
    value = str(text).strip()
    if value == "both":
        return list(SETTINGS)
    if value not in SETTINGS:
        raise KvcError(f"--setting: unknown value {value!r} (expected query-aware, query-agnostic or both)")
    return [value]


def parse_settings(tasks: str, methods: str, budgets: str, lengths: str, depths: str, *, known_tasks,
                   known_methods, **extra) -> Settings:
    """Settings from the CLI's comma-separated lists, checked; `extra` sets the remaining fields."""
    return Settings(
        tasks=names(tasks, known_tasks, "--tasks"),
        methods=names(methods, known_methods, "--methods"),
        budgets=numbers(budgets, "--budgets", float, 0.0, 1.0, low_open=True),
        lengths=numbers(lengths, "--lengths", int, 1, float("inf"), low_open=False),
        depths=numbers(depths, "--depths", float, 0.0, 1.0, low_open=False),
        **extra,
    )


def check_lengths(settings: Settings, model_limit: int, asks: bool = True) -> None:
    """Refuse prompt lengths the model has no positions for, before building any prompt (asks: some
    task has a question, so the query-agnostic setting may run kvc's probe after the context)."""
    longest = max(settings.lengths)
    if model_limit and longest >= model_limit:
        raise KvcError(f"--lengths: {longest} tokens leave no room for an answer within the "
                       f"model's limit of {model_limit} positions")
    from kvc.runtime.probe import REREADING, SHORTEST_PART  # the runtime (torch, kernels) only when lengths are checked

    probed = asks and "query-agnostic" in settings.setting and any(method.startswith("kvc") for method in settings.methods)
    if model_limit and probed and settings.context_probe in REREADING and longest + SHORTEST_PART > model_limit:
        raise KvcError(f"--lengths: the reconstruction probe rereads a context of {longest} tokens in parts after "
                       f"it, at least {SHORTEST_PART} tokens each, past the model's {model_limit} positions; "
                       f"use --context-probe window, generic or expected")


def check_backend(task: str, backend: str) -> None:
    """Refuse, before any work, a backend kvc does not have or a task it does not run."""
    if backend not in BACKENDS:
        raise KvcError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime" and task not in ONNX_TASKS:
        raise KvcError(f"--backend onnxruntime runs the tasks {', '.join(ONNX_TASKS)}, not {task}")
