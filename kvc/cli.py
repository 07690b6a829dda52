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
