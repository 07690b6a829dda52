"""The `kvc` command: parse, call the library, render with rich.

User errors (`KvcError`, bad options) print one line and exit with code 2, no traceback;
`--debug` shows tracebacks. Nothing here holds logic the Python API lacks.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvc import __version__
from kvc.files import os_reason
from kvc.interrupts import Interrupted, signals_interrupt
from kvc.outputs import check_files, check_inputs, recorded_path
from kvc.policies.errors import KvcError

# The help's panels: build a plan, run it, deploy it; inspect artifacts.
BUILD, RUN, DEPLOY, INSPECT = "Build: profile a model, compile a plan", "Run: generate and evaluate", \
    "Deploy: ONNX and vLLM", "Inspect artifacts and models"


class WorkflowGroup(TyperGroup):
    """Lists the commands in the order of the workflow, then the ones that inspect."""

    ORDER = ("profile", "compile", "generate", "eval", "export", "serve", "show", "validate", "models")

    def list_commands(self, ctx):
        order = {name: index for index, name in enumerate(self.ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: (order.get(name, len(order)), name))


app = typer.Typer(
    cls=WorkflowGroup,
    help="kvc: a KV-cache compiler. Profile attention heads, compile a memory plan, run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
PIPE_WIDTH = 200


def output_console() -> Console:
    """The terminal's width (or COLUMNS); a file or pipe has none, so its tables get as wide as they need (rich
    would cut them to 80 columns, and a long run's log would hold every header cut short)."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPE_WIDTH if piped else None)


console = output_console()
errors = Console(stderr=True)


def say(line: str) -> None:
    """A line naming files: printed on one line however long (a folded path cannot be pasted back)
    and as written (a path may hold `[...]`, which rich would read as markup)."""
    console.print(line, soft_wrap=True, markup=False)


_state = {"debug": False}

MODEL_ARGUMENT = typer.Argument(None, help="Alias, hub id, model folder or .gguf file \\[default: smollm2-135m].")


def _version(value: bool):
    if value:
        console.print(f"kvc {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    _state["debug"] = debug


@app.command(rich_help_panel=INSPECT)
def models():
    """List the model aliases and whether each is available on this machine."""
    from kvc.models import ALIASES, available_locally

    table = Table(title="Model aliases")
    table.add_column("alias", no_wrap=True)
    table.add_column("hub id", no_wrap=True)
    table.add_column("description")
    table.add_column("local", no_wrap=True)
    for alias, (repo_id, description) in ALIASES.items():
        here = available_locally(alias)
        table.add_row(alias, repo_id, description, "[green]yes[/]" if here else "[dim]no[/]")
    console.print(table)
    console.print("Any hub id in the local cache, a model folder or a .gguf file works too.")


@app.command(rich_help_panel=INSPECT)
def validate(file: Path = typer.Argument(..., help="A policy (.yaml/.json) or a plan file.")):
    """Check a policy or plan file; print what is wrong, with its path inside the file."""
    from kvc.report import load_artifact  # torch only for a plan

    artifact = load_artifact(file)
    console.print(f"[green]ok[/]: {escape(str(file))} is a valid {artifact.__class__.__name__.lower()} "
                  f"for {escape(artifact_model_name(artifact))}", soft_wrap=True)


def artifact_model_name(artifact) -> str:
    return getattr(artifact, "model_name", None) or artifact.model.name


@app.command(rich_help_panel=INSPECT)
def show(
    file: Path = typer.Argument(..., help="A policy (.yaml/.json) or a plan file."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also draw the kinds heatmap (and funnel) to this PNG."),
):
    """Summarise a policy or a plan: per layer, the kinds of its KV heads and what they recover."""
    check_files({"--png": png}, {"file": file})
    from kvc import report  # torch only for a plan

    artifact = report.load_artifact(file)
    report.render(artifact, console)
    if png is not None:
        report.draw(artifact, png)
        say(f"wrote {png}")


@app.command("generate", rich_help_panel=RUN)
def generate_command(
    model: Optional[str] = MODEL_ARGUMENT,
    plan: Optional[Path] = typer.Option(None, "--plan", help="A compiled plan; without it the full cache runs."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template; a prompt file "
                              "with several user turns, separated by lines of ---, is one conversation in one cache."),
    interactive: bool = typer.Option(False, "--interactive", help="Chat: read user turns from the terminal, one a "
                                     "line, until an empty line or end of input; the cache carries the conversation."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Run a `kvc export` folder in onnxruntime instead of "
                                        "the model in torch (its plan and tokenizer come with it)."),
    temperature: float = typer.Option(0.0, "--temperature", help="With --onnx: sample at this temperature (0: greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="With --onnx: sample from the smallest set of tokens holding this much probability."),
    seed: int = typer.Option(0, "--seed", help="With --onnx: the sampler's seed."),
    compile_step: bool = typer.Option(False, "--compile", help="With --plan: decode with the plan's step compiled by torch.compile (the same tokens; the first step compiles, about 3 minutes for the embedded model on a 2-core CPU, then each step runs about twice as fast as eagerly: 1.8 times at 2K tokens, 2.3-2.5 at 7.5K in the benchmarks; in a conversation the first reply compiles it for all)."),
    context_probe: str = typer.Option("window", "--context-probe", help="With --plan in a conversation whose first turn is a document the later turns ask about: what picks the tokens of the plan's SnapKV-style heads in it: window (the turn's last 32 queries), generic (a short fixed question), reconstruct (the model reads the turn again after a request to repeat it: 2.6-4.7 times its prefill on a CPU), expected (the attention the queries to come are expected to give each token, from the turn's own queries: no extra reading) or reconstruct+expected (both; best on the query-agnostic evaluation)."),
):
    """Continue a prompt greedily through a plan's compressed cache (or the full cache) and show the bytes."""
    from kvc.policies.probes import check_probe
    from kvc.runtime.prompts import read_prompt, split_turns

    if interactive and not chat:
        raise KvcError("--interactive is a chat: add --chat")
    if check_probe(context_probe) != "window" and (onnx is not None or plan is None):
        raise KvcError("--context-probe picks what a plan's cache keeps in the torch runtime: give --plan, not --onnx")
    if compile_step and onnx is not None:
        raise KvcError("--compile compiles the torch runtime's step; the onnxruntime graphs run as exported")
    text = None if interactive and prompt is None and prompt_file is None else read_prompt(prompt, prompt_file)
    if onnx is not None:
        generate_onnx(onnx, model, plan, text, interactive, max_new_tokens, chat, device, temperature, top_p, seed)
        return
    if temperature or top_p != 1.0:
        raise KvcError("--temperature and --top-p sample through --onnx; the torch runtime decodes greedily")
    turns = split_turns(text) if chat and text is not None else []
    if compile_step and plan is None:
        raise KvcError("--compile decodes through a plan's compressed step: give --plan")
    if context_probe != "window" and not (interactive or len(turns) > 1):
        raise KvcError("--context-probe scores a first turn compressed before later ones: give a conversation "
                       "(--chat with turns separated by ---, or --interactive)")
    from kvc.models import load, resolve

    resolve(model)
    check_inputs({"plan file": plan})
    from kvc.plan import Plan  # torch (seconds): only once the options, the prompt, the model and the plan file are checked

    compiled = Plan.load(plan) if plan is not None else None
    from kvc.runtime.generate import generate  # transformers (seconds more): once the plan is read

    loaded = load(model, dtype=dtype, device=device)
    if interactive or len(turns) > 1:
        converse(loaded, compiled, turns, interactive, max_new_tokens, context_probe, compile_step)
        return
    result = generate(loaded, text, compiled, max_new_tokens, chat, compile=compile_step)
    console.print(result.texts[0], markup=False, highlight=False)
    console.print(result.summary(), style="dim", highlight=False, soft_wrap=True)


def generate_onnx(folder, model, plan, text, interactive, max_new_tokens, chat, device, temperature, top_p, seed):
    """`kvc generate --onnx DIR`: the export's graphs in onnxruntime."""
    from kvc.export.onnx import OnnxGenerator
    from kvc.runtime.prompts import split_turns

    if model is not None or plan is not None:
        raise KvcError("--onnx runs the export's own model and plan: leave out MODEL and --plan")
    if interactive or (chat and len(split_turns(text)) > 1):
        raise KvcError("--onnx continues one prompt; conversations run in the torch runtime")
    generator = OnnxGenerator(folder, device)
    result = generator.generate(text, max_new_tokens, chat, temperature, top_p, seed)
    console.print(result.texts[0], markup=False, highlight=False)
    console.print(result.summary(), style="dim", highlight=False, soft_wrap=True)


def converse(loaded, plan, turns: list[str], interactive: bool, max_new_tokens: int,
             context_probe: str = "window", compile_step: bool = False) -> None:
    """A conversation through one cache: the given turns, then (interactive) the terminal's."""
    from kvc.report import human_bytes
    from kvc.runtime.conversation import Conversation

    def lines():
        yield from turns
        while interactive:
            try:
                line = input("you> ")
            except EOFError:
                return
            if not line.strip():
                return
            yield line

    with Conversation(loaded, plan, context_probe=context_probe, compile=compile_step) as conversation:
        for text in lines():
            turn = conversation.say(text, max_new_tokens)
            if not interactive:
                console.print(f"user: {text}", markup=False, highlight=False)
            console.print(f"assistant: {turn.reply}", markup=False, highlight=False)
            console.print(f"turn fed {turn.added_tokens} tokens, replied {turn.new_tokens}; the cache holds "
                          f"{turn.cached_tokens} tokens in {human_bytes(turn.cache_bytes)}", style="dim", highlight=False)


@app.command("export", rich_help_panel=DEPLOY)
def export_command(
    model: Optional[str] = MODEL_ARGUMENT,
    plan: Path = typer.Option(..., "--plan", help="The compiled plan whose cache the graphs hold."),
    out: Path = typer.Option(..., "--out", help="The folder to write (created; an earlier export there is replaced)."),
    chunk: int = typer.Option(1, "--chunk", help="New tokens per step graph call (1 decodes; more feed text in chunks)."),
    batch: int = typer.Option(1, "--batch", help="Sequences per call (at most the plan's batch)."),
):
    """Export a model and its plan as ONNX graphs that onnxruntime runs.

    prefill.onnx and step.onnx take and return the compressed cache's tensors; weights, plan, tokenizer and a manifest lie beside them.
    """
    from kvc.export.folder import check_out_folder
    from kvc.models import load, resolve

    check_out_folder(out)
    resolve(model)
    check_inputs({"plan file": plan})
    from kvc.plan import Plan  # torch (seconds): only once the destination, the model and the plan file are checked

    compiled = Plan.load(plan)
    from kvc.export.exporter import check_exportable, export  # transformers (seconds more): once the plan is read
    from kvc.report import human_bytes

    loaded = load(model, dtype="float32", device="cpu")
    check_exportable(loaded, compiled, batch, chunk)
    with console.status("exporting") as status:
        try:
            exported = export(loaded, compiled, out, chunk, batch, progress=lambda step: status.update(step))
        except (KeyboardInterrupt, Interrupted):
            raise Interrupted(f"nothing was written to {out}") from None
    manifest = exported.manifest
    for name, size in manifest["files"].items():
        console.print(f"  {name:<14} {human_bytes(size):>11}", highlight=False)
    console.print(f"cache state: {len(manifest['state'])} tensors, {human_bytes(manifest['state_bytes'])} per call "
                  f"+ {human_bytes(manifest['plan']['table_bytes'])} of plan tables in the graphs = the plan's "
                  f"{human_bytes(manifest['plan']['cache_bytes'])}", highlight=False)
    say(f"exported in {exported.seconds:.0f} s; wrote {out}")


@app.command("compile", rich_help_panel=BUILD)
def compile_command(
    policy: Path = typer.Argument(..., help="A policy file (.yaml/.json) from `kvc profile`."),
    target: Optional[float] = typer.Option(None, "--target", help="Share of the full cache's bytes at --max-len the plan may use \\[default: 0.25]."),
    memory: Optional[str] = typer.Option(None, "--memory", help="The budget as a size instead of --target: 512MiB, 2GiB, 1.5GB or bytes."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Longest sequence the plan serves \\[default: the model's limit]."),
    batch: int = typer.Option(1, "--batch", help="Sequences served together."),
    dtype: str = typer.Option("bf16", "--dtype", help="Cache dtype: bf16, fp16 or fp32."),
    strategy: str = typer.Option("retrieval", "--strategy", help="retrieval (retrieval heads whole, SnapKV elsewhere), knapsack, fastgen, pyramid or uniform."),
    retrieval_threshold: Optional[float] = typer.Option(None, "--retrieval-threshold", help="Least retrieval score of a head the retrieval strategy keeps whole \\[default: 0.02]; higher keeps fewer whole and gives the others more."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="Store keys and values as 8, 4 or 2-bit codes (float16 step and minimum per 32 channels), so the same memory holds more tokens; 0 keeps --dtype \\[default: 8]."),
    merge_similarity: str = typer.Option("auto", "--merge-similarity", help="SnapKV-style heads fold each prompt token they evict into the heavy hitter whose key is most like its own (in a context prefilled before its questions, --context-probe: the most like it of any kept token but the sinks), when the keys' cosine similarity is at least this (-1: every one); off drops them; auto merges at 0.5 in a retrieval plan for 10% of the full cache or less, where it measured better, and drops them above."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="Tensor-parallel ranks the plan will be served over (`kvc serve --tensor-parallel-size N`): each rank's KV heads get an equal share of the budget, so no rank holds more than its share."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the plan \\[default: POLICY with suffix .plan]."),
    json_report: Optional[Path] = typer.Option(None, "--json", help="Also write the compile report here as JSON."),
):
    """Compile a policy into a static KV-cache plan for a memory target and show what it costs and recovers."""
    import time

    from kvc.compiler.outputs import plan_path, write_outputs

    out = plan_path(policy, out)
    check_files({"--out": out, "--json": json_report}, {"policy file": policy})
    from kvc.policies.schema import load_policy

    loaded = load_policy(policy)
    from kvc.compiler import compile_policy, plan_report, summary_lines  # torch (seconds): once the policy is read
    from kvc.report import render_plan

    started = time.perf_counter()
    plan = compile_policy(loaded, target, memory=memory, max_len=max_len, batch=batch, dtype=dtype, strategy=strategy,
                          retrieval_threshold=retrieval_threshold, kv_bits=kv_bits,
                          merge_similarity=merge_similarity, tensor_parallel_size=tensor_parallel_size)
    seconds = time.perf_counter() - started
    report = plan_report(plan)
    write_outputs(plan, report, out, json_report)
    render_plan(plan, console)
    for line in summary_lines(report):
        console.print(line, highlight=False)
    say(f"compiled in {1000 * seconds:.0f} ms; wrote {out}" + (f" and {json_report}" if json_report else ""))


@app.command("profile", rich_help_panel=BUILD)
def profile_command(
    model: Optional[str] = MODEL_ARGUMENT,
    prompts: str = typer.Option("builtin", "--prompts", help="builtin, a .jsonl file ({\"text\": ...} or {\"messages\": [...]} per line), a .txt file, or a folder of them."),
    threshold: float = typer.Option(0.95, "--threshold", help="FastGen's recovery threshold T, in (0, 1]."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Profile at most this many tokens of a prompt (never more than the model's limit)."),
    strict: bool = typer.Option(False, "--strict", help="Refuse a prompt over the limit instead of cutting it with a warning."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N; auto on CUDA spreads the model with device_map."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    out: Path = typer.Option(..., "--out", help="Where to write the policy (.yaml, or .json)."),
):
    """Profile a model's attention heads on prompts and write the policy: FastGen kinds, recovery curves, funnel."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvc.models import architecture, resolve

    from kvc.profiler.prompts import load_prompts
    from kvc.profiler.settings import check_threshold

    check_files({"--out": out}, {"model": model, "prompt file": prompts})
    resolve(model)  # an unknown model, a wrong threshold or prompt file are named before torch loads (seconds)
    check_threshold(threshold)
    prompt_set = load_prompts(prompts)
    from kvc.profiler import profile as profiler
    loaded = profiler.load_model(model, device=device, dtype=dtype)
    steps = profiler.progress_steps(len(prompt_set.prompts), architecture(loaded.model.config).num_layers)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("profiling", total=steps)
        try:
            policy = profiler.profile_model(
                loaded, prompt_set, threshold, max_tokens=max_tokens, strict=strict,
                progress=lambda name: bar.update(task, advance=1, description=f"profiling {escape(name)}"),
                warn=lambda message: bar.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False),
            )
        except (KeyboardInterrupt, Interrupted):
            raise Interrupted(f"nothing was written to {out}") from None
    policy.save(out)
    for line in profiler.summary_lines(profiler.summarise(policy)):
        console.print(line, highlight=False)
    say(f"profiled {policy.profile.prompt_count} prompts ({sum(policy.profile.token_counts)} tokens) "
        f"in {policy.profile.seconds:.0f} s; wrote {out}")


@app.command("eval", rich_help_panel=RUN)
def eval_command(
    model: Optional[str] = MODEL_ARGUMENT,
    policy: Optional[Path] = typer.Option(None, "--policy", help="A policy from `kvc profile` (kvc, kvc-knapsack, kvc-fastgen, snapkv, pyramidkv and adakv need one)."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A compiled plan to evaluate as the kvc method instead of compiling one."),
    tasks: str = typer.Option("passkey,niah,ppl", "--tasks", help="Comma-separated: passkey, niah, multikey, multivalue, vartrack, fwe (RULER-style: several needles, all values of a key, chained variables, frequent words), fidelity (128 greedy tokens on open-ended prompts against the full cache's; needs full), ppl, recovery (attention mass the cache holds, on held-out text)."),
    setting: str = typer.Option("both", "--setting", help="Where a question is asked: query-aware (compressed with the context), query-agnostic (appended after the context was compressed, as for a cached document) or both."),
    methods: str = typer.Option("kvc,kvc-plain,kvc-knapsack,kvc-fastgen,full,streamingllm,h2o,snapkv,pyramidkv,adakv", "--methods", help="Comma-separated methods: also kvc-4bit (the retrieval plan with 4-bit rows), kvc-merge (evicted prompt tokens merged at every budget) and kvc-drop (dropped at every budget; kvc merges at 10% or less); the README lists each."),
    budgets: str = typer.Option("0.25", "--budgets", help="Comma-separated shares of the full cache's bytes, in (0, 1]."),
    lengths: str = typer.Option("1024", "--lengths", help="Comma-separated prompt lengths in tokens."),
    depths: str = typer.Option("0,0.5,1", "--depths", help="Comma-separated needle depths in [0, 1]."),
    samples: int = typer.Option(1, "--samples", min=1, help="Samples per task, length and depth: passkeys of seeds F..F+N-1, needle haystacks starting at essays F..F+N-1, perplexity passages F..F+N-1 back from the end (F: --first-sample)."),
    first_sample: int = typer.Option(0, "--first-sample", min=0, help="The number F of the first sample, to evaluate on samples kept apart from others (tuning, earlier runs)."),
    answer_tokens: Optional[int] = typer.Option(None, "--answer-tokens", min=1, help="Tokens decoded after passkey and needle prompts (default: 12 for the passkey, 20 for the needle, whose answer is 15)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every record and the settings here, after every sample: the same command resumes an unfinished run (a file of another run is left alone)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Draw the Pareto plot (cache bytes vs score) here."),
    cache_dtype: str = typer.Option("bf16", "--cache-dtype", help="Dtype of every method's cache (bf16, fp16 or fp32; kvc's low-bit rows aside): budgets are shares of a full cache in it. The model computes in fp32."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: str = typer.Option("torch", "--backend", help="torch (kvc's runtime) or onnxruntime: each plan exported once (kept in the kvc cache) and its graphs run by onnxruntime; passkey and niah only."),
    context_probe: str | None = typer.Option(None, "--context-probe", help="Query-agnostic, what picks the tokens of kvc's SnapKV-style heads: reconstruct+expected (the default with --backend torch: the model reads the context again after a request to repeat it, 2.6-4.7 times the prefill on a CPU, and adds the attention the queries to come are expected to give each token), reconstruct or expected (either alone), generic (a short fixed question) or window (the context's last 32 queries; the only one the onnxruntime backend runs, and its default). Baselines keep their published scoring."),
):
    """Evaluate kvc and the baselines at equal cache bytes on retrieval, RULER-style tasks, generation fidelity and perplexity, with the question asked before or after compression.

    The last table holds kvc against the best published baseline prompt by prompt: the mean difference, its 95% bootstrap interval and whether the prompts can tell the two apart (10 prompts or more per cell).

    Records are saved as the run goes (to --json, or the kvc cache); the same command resumes a stopped run."""
    from kvc.compiler.sizes import parse_dtype
    from kvc.eval.settings import METHOD_NAMES, TASK_NAMES, check_backend, parse_settings, question_settings
    from kvc.models import resolve

    settings = parse_settings(tasks, methods, budgets, lengths, depths, known_tasks=TASK_NAMES, known_methods=METHOD_NAMES,
                              answer_tokens=answer_tokens, samples=samples, first_sample=first_sample,
                              dtype=parse_dtype(cache_dtype, "--cache-dtype"), policy=recorded_path(policy),
                              plan=recorded_path(plan), setting=question_settings(setting), backend=backend,
                              context_probe=eval_probe(context_probe, backend))
    for task in settings.tasks:
        check_backend(task, backend)  # refuse a task the backend does not run before any work
    check_files({"--json": json_out, "--png": png}, {"model": model, "policy file": policy, "plan file": plan})
    check_inputs({"policy file": policy, "plan file": plan})
    resolve(model)  # an unknown model is named before torch and transformers load (seconds)
    run_evaluation(model, settings, policy, plan, json_out, png, device)


def eval_probe(probe: str | None, backend: str) -> str:
    """The evaluation's context probe: reconstruct+expected by default; the exported graphs run none (window)."""
    from kvc.policies.probes import DEFAULT_PROBE, check_probe

    if backend != "onnxruntime":
        return check_probe(probe or DEFAULT_PROBE)
    if check_probe(probe or "window") != "window":
        raise KvcError(f"--context-probe {probe}: the onnxruntime backend's graphs run no probe; "
                       "leave the option out (window) or use --backend torch")
    return "window"


def run_evaluation(model, settings, policy_path, plan_path, json_out, png, device) -> None:
    from kvc.eval import report
    from kvc.eval.baselines import METHODS
    from kvc.eval.harness import TASKS, evaluate
    from kvc.eval.progress import Progress, run_identity
    from kvc.eval.settings import check_lengths
    from kvc.files import all_or_none
    from kvc.models import architecture, load
    from kvc.plan import Plan
    from kvc.policies.schema import dump_policy, load_policy

    needing = [m for m in settings.methods if METHODS[m].needs_policy and not (m == "kvc" and plan_path)]
    policy = load_policy(policy_path) if policy_path is not None else None
    plan = Plan.load(plan_path) if plan_path is not None else None
    loaded = load(model, dtype="float32", device=device)
    check_lengths(settings, architecture(loaded.model.config).max_position_embeddings,
                  asks=any(TASKS[task].asks for task in settings.tasks))
    settings.model = loaded.source.name
    if needing and policy is None:
        policy, settings.policy = default_policy(loaded)
    identity = run_identity(loaded.fingerprint, settings, policy and dump_policy(policy),
                            plan_path and Path(plan_path).read_bytes())
    progress = Progress.for_run(json_out, identity, settings)
    done, seconds = progress.earlier()
    if done:
        say(f"resuming: {len(done)} record{'s' * (len(done) != 1)} of an earlier run read from {progress.path}")
    elif differences := progress.differences():  # its records would be lost: the user decides
        raise KvcError(f"--json {progress.path} holds the records of another run ({'; '.join(differences)}); "
                       "run that one's command to resume it, or give another --json (or remove the file) to start afresh")
    try:
        results = evaluate(loaded, settings, policy, plan, done=done, seconds=seconds, on_record=progress.save)
    except (KeyboardInterrupt, Interrupted):
        raise Interrupted(progress.where()) from None
    console.print(report.render(results))
    with all_or_none():
        progress.finish(results)
        if png is not None:
            report.draw(results, png)
    for path in (json_out, png):
        if path is not None:
            say(f"wrote {path}")


@app.command("serve", rich_help_panel=DEPLOY, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_command(
    ctx: typer.Context,
    model: Optional[str] = MODEL_ARGUMENT,
    plan: Path = typer.Option(..., "--plan", help="The compiled plan to serve (`kvc compile`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
):
    """Serve MODEL through vLLM's OpenAI-compatible server with PLAN's compressed cache (needs kvc\\[vllm]).

    Further options go to `vllm serve` (e.g. --dtype float32 --max-num-seqs 8 --kv-cache-memory-bytes 1G).
    Each request holds the plan's bytes per sequence; prefix caching is off.

    Every prompt prefills whole (chunked prefill off) unless --max-num-batched-tokens is below the plan's max length.
    """
    check_inputs({"plan file": plan})  # before torch and vLLM load (seconds)
    from kvc.serving.vllm.server import serve

    extra = list(ctx.args)
    if model is not None and model.startswith("-"):  # no MODEL: the first vLLM option landed in its place
        model, extra = None, [model, *extra]
    serve(model, plan, extra, host, port)


def default_policy(loaded):
    """Without --policy: the demo's policy of this model on the built-in prompts, profiled once and cached."""
    from kvc.demo import cached_policy, cached_policy_path

    say(f"no --policy given: using the policy of {loaded.source.name} on the built-in prompts (as `make demo` does)")
    return cached_policy(loaded, console), recorded_path(cached_policy_path(loaded))


def main(argv=None):
    """Entry point: run the app, turning user errors into one line and exit code 2.

    A usage error (an unknown option, a missing argument, a value out of its range) is one line too,
    naming the help to read; Ctrl-C and SIGTERM end any command the same way, "error: interrupted"
    and exit code 2, after its temporary files are removed."""
    usage = importlib.import_module(typer.BadParameter.__module__)  # click's exceptions, or typer's copy of them
    no_args = getattr(usage, "NoArgsIsHelpError", ())  # click >= 8.2
    try:
        with signals_interrupt():
            code = app(args=argv, prog_name="kvc", standalone_mode=False)  # usage errors come here, not as a panel
    except no_args as error:  # `kvc` alone: the help
        error.show()
        sys.exit(error.exit_code)
    except usage.UsageError as error:
        where = error.ctx.command_path if error.ctx is not None else "kvc"
        fail(f"{error.format_message().rstrip('.')} (see '{where} --help')")
    except typer.Abort:  # end of input at a prompt
        fail("aborted")
    except KvcError as error:
        if _state["debug"]:
            raise
        fail(str(error))
    except Interrupted as stop:
        fail("interrupted" + (f"; {stop}" if str(stop) else ""))
    except OSError as error:  # one the commands did not foresee: still one line
        if _state["debug"]:
            raise
        fail((f"{error.filename}: " if error.filename else "") + os_reason(error))
    sys.exit(code if isinstance(code, int) else 0)


def fail(message: str):
    errors.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # paths may hold [...]
    sys.exit(2)


if __name__ == "__main__":
    main()
