"""The `kvc` command: parse, call the library, render with rich.

User errors (`KvcError`, bad options) print one line and exit with code 2, no traceback;
`--debug` shows tracebacks. Nothing here holds logic the Python API lacks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from kvc import __version__
from kvc.policies.errors import KvcError

app = typer.Typer(
    help="kvc: a KV-cache compiler. Profile attention heads, compile a memory plan, run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)
_state = {"debug": False}

MODEL_ARGUMENT = typer.Argument(None, help="Alias, hub id, model folder or .gguf file [default: smollm2-135m].")


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


@app.command()
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


@app.command()
def validate(file: Path = typer.Argument(..., help="A policy (.yaml/.json) or a plan file.")):
    """Check a policy or plan file; print what is wrong, with its path inside the file."""
    from kvc.report import load_artifact

    artifact = load_artifact(file)
    console.print(f"[green]ok[/]: {file} is a valid {artifact.__class__.__name__.lower()} "
                  f"for {artifact_model_name(artifact)}")


def artifact_model_name(artifact) -> str:
    return getattr(artifact, "model_name", None) or artifact.model.name


@app.command()
def show(
    file: Path = typer.Argument(..., help="A policy (.yaml/.json) or a plan file."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also draw the kinds heatmap (and funnel) to this PNG."),
):
    """Summarise a policy or a plan: per layer, the kinds of its KV heads and what they recover."""
    from kvc import report

    artifact = report.load_artifact(file)
    report.render(artifact, console)
    if png is not None:
        report.draw(artifact, png)
        console.print(f"wrote {png}")


@app.command("generate")
def generate_command(
    model: Optional[str] = MODEL_ARGUMENT,
    plan: Optional[Path] = typer.Option(None, "--plan", help="A compiled plan; without it the full cache runs."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt text."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
):
    """Continue a prompt greedily through a plan's compressed cache (or the full cache) and show the bytes."""
    from kvc.models import load
    from kvc.plan import Plan
    from kvc.runtime.generate import generate, read_prompt

    text = read_prompt(prompt, prompt_file)
    compiled = Plan.load(plan) if plan is not None else None
    result = generate(load(model, dtype=dtype, device=device), text, compiled, max_new_tokens, chat)
    console.print(result.texts[0], markup=False, highlight=False)
    console.print(result.summary(), style="dim", highlight=False, soft_wrap=True)


@app.command("compile")
def compile_command(
    policy: Path = typer.Argument(..., help="A policy file (.yaml/.json) from `kvc profile`."),
    target: Optional[float] = typer.Option(None, "--target", help="Share of the full cache's bytes at --max-len the plan may use [default: 0.25]."),
    memory: Optional[str] = typer.Option(None, "--memory", help="The budget as a size instead of --target: 512MiB, 2GiB, 1.5GB or bytes."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Longest sequence the plan serves [default: the model's limit]."),
    batch: int = typer.Option(1, "--batch", help="Sequences served together."),
    dtype: str = typer.Option("bf16", "--dtype", help="Cache dtype: bf16, fp16 or fp32."),
    strategy: str = typer.Option("knapsack", "--strategy", help="knapsack, fastgen, pyramid or uniform."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the plan [default: POLICY with suffix .plan]."),
    json_report: Optional[Path] = typer.Option(None, "--json", help="Also write the compile report here as JSON."),
):
    """Compile a policy into a static KV-cache plan for a memory target and show what it costs and recovers."""
    import time

    from kvc.compiler import compile_policy, plan_report, summary_lines
    from kvc.compiler.outputs import check_destinations, plan_path, write_outputs
    from kvc.policies.schema import load_policy
    from kvc.report import render_plan

    out = plan_path(policy, out)
    check_destinations(out, json_report)
    loaded = load_policy(policy)
    started = time.perf_counter()
    plan = compile_policy(loaded, target, memory=memory, max_len=max_len, batch=batch, dtype=dtype, strategy=strategy)
    seconds = time.perf_counter() - started
    report = plan_report(plan)
    write_outputs(plan, report, out, json_report)
    render_plan(plan, console)
    for line in summary_lines(report):
        console.print(line, highlight=False)
    console.print(f"compiled in {1000 * seconds:.0f} ms; wrote {out}" + (f" and {json_report}" if json_report else ""))

def main(argv=None):
    """Entry point: run the app, turning user errors into one line and exit code 2.

    Typer's standalone mode already turns usage errors into exit code 2."""
    try:
        app(args=argv)
    except KvcError as error:
        if _state["debug"]:
            raise
        errors.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
