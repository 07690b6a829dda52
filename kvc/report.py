"""Show policies and plans to people: rich tables in the terminal, heatmaps in PNG files.

`load_artifact` tells a plan (safetensors) from a policy (YAML/JSON) by its first bytes. Plans
(torch tensors) are read and shown with torch, policies without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from kvc.compiler.sizes import format_size as human_bytes
from kvc.policies.errors import KvcError
from kvc.policies.kinds import FASTGEN_POLICIES
from kvc.files import atomic_write_bytes
from kvc.policies.schema import Policy, load_policy
from kvc.policies.structured import input_file

if TYPE_CHECKING:
    from kvc.plan import Plan

KIND_COLOURS = {
    "special": "#4c72b0", "special+punct": "#64b5cd", "special+punct+frequency": "#55a868",
    "special+punct+frequency+local": "#ccb974", "full": "#c44e52",
}


def is_plan_file(path: Path) -> bool:
    """A plan by its name (.plan) or its first bytes: a safetensors file starts with its header's
    size as a little-endian u64, whose high bytes are zero (no text file holds a zero byte), then '{'."""
    if path.suffix.lower() == ".plan":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return head[8:9] == b"{" and b"\x00" in head[:8]


def load_artifact(path) -> Policy | Plan:
    path = input_file(path, "policy or plan file")
    if not is_plan_file(path):
        return load_policy(path)
    from kvc.plan import Plan  # torch

    return Plan.load(path)


def render(artifact, console) -> None:
    (render_policy if isinstance(artifact, Policy) else render_plan)(artifact, console)


def draw(artifact, png) -> Path:
    return (draw_policy if isinstance(artifact, Policy) else draw_plan)(artifact, png)


# ------------------------------------------------------------------ policies

def kind_counts(policy: Policy) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in policy.layers:
        for head in layer.heads:
            counts[head.kind] = counts.get(head.kind, 0) + 1
    return counts


def render_policy(policy: Policy, console) -> None:
    from rich.table import Table

    model, profile = policy.model, policy.profile
    console.print(
        f"[bold]{escape(model.name)}[/] policy · {model.num_layers} layers × {model.num_kv_heads} KV heads "
        f"({model.num_attention_heads} query heads, head dim {model.head_dim}) · fingerprint {model.fingerprint}"
    )
    if profile.prompt_count:
        console.print(
            f"profiled on {profile.prompt_count} prompts of '{escape(profile.prompt_set)}' "
            f"({sum(profile.token_counts)} tokens) at threshold {profile.threshold} in {profile.seconds:.0f} s"
        )
    table = Table()
    for column in ("layer", "funnel", "kinds (per KV head)", "recovery", "retrieval"):
        table.add_column(column)
    for layer in policy.layers:
        kinds = "  ".join(head.kind for head in layer.heads)
        recovery = " ".join(f"{head.recovery:.3f}" for head in layer.heads)
        retrieval = " ".join("-" if head.retrieval is None else f"{head.retrieval:.3f}" for head in layer.heads)
        table.add_row(str(layer.index), f"{layer.funnel:.3f}", kinds, recovery, retrieval)
    console.print(table)
    counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(kind_counts(policy).items()))
    heads = [h for layer in policy.layers for h in layer.heads]
    mean = sum(h.recovery for h in heads) / len(heads)
    console.print(f"heads per kind: {counts} · mean recovery {mean:.3f}")


def _save_figure(figure, png) -> Path:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return atomic_write_bytes(png, buffer.getvalue())


def draw_policy(policy: Policy, png) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    order = list(FASTGEN_POLICIES) + sorted({h.kind for l in policy.layers for h in l.heads} - set(FASTGEN_POLICIES))
    grid = [[order.index(h.kind) for h in layer.heads] for layer in policy.layers]
    colours = [KIND_COLOURS.get(kind, "#8172b2") for kind in order]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, max(4, policy.model.num_layers * 0.22)),
                                         gridspec_kw={"width_ratios": [max(2, policy.model.num_kv_heads), 3]})
    left.imshow(grid, aspect="auto", cmap=ListedColormap(colours), vmin=-0.5, vmax=len(order) - 0.5,
                interpolation="nearest")
    left.set_xlabel("KV head")
    left.set_ylabel("layer")
    left.set_title("head kinds")
    left.set_xticks(range(policy.model.num_kv_heads))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    left.legend(handles, order, loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=7, ncol=1)
    funnel = [layer.funnel for layer in policy.layers]
    right.plot(funnel, range(len(funnel)), marker="o")
    right.invert_yaxis()
    right.set_xlabel("funnel (share of keys carrying 90% of attention)")
    right.set_title("layer funnel")
    figure.suptitle(f"{policy.model.name}")
    return _save_figure(figure, png)


# ------------------------------------------------------------------ plans

KIND_LETTERS = {"special": "s", "punct": "p", "frequency": "f", "local": "l"}
KIND_LEGEND = "kinds: s special tokens and sinks, p punctuation, f heavy hitters, l recent window, full everything"


def short_kind(kind: str) -> str:
    """'special+punct+frequency' -> 'spf'; 'full' stays; a head without slots is '-'."""
    if kind in ("full", ""):
        return kind or "-"
    return "".join(KIND_LETTERS[part] for part in kind.split("+"))


def render_plan(plan: Plan, console) -> None:
    from rich.table import Table

    from kvc.compiler.report import plan_report, sequence_line

    report, target = plan_report(plan), plan.target
    console.print(
        f"[bold]{escape(plan.model_name)}[/] plan · strategy {plan.strategy or '-'} · max len {target.max_len} · "
        f"batch {target.batch} · {target.dtype}{f' · K/V {plan.kv_bits}-bit' if plan.kv_bits else ''} · "
        f"{f'{plan.tensor_parallel_size} tensor-parallel ranks · ' if plan.tensor_parallel_size > 1 else ''}"
        f"fingerprint {plan.fingerprint}"
    )
    table = Table()
    kinds = [" ".join(short_kind(kind) for kind in layer["kinds"]) for layer in report["layers"]]
    table.add_column("layer")
    table.add_column("kinds (per KV head)", max_width=max(10, *map(len, kinds)))
    table.add_column("slots (per KV head)")
    for column in ("bytes", "% of full", "expected recovery"):
        table.add_column(column, justify="right")
    for layer, layer_kinds in zip(report["layers"], kinds):
        table.add_row(str(layer["layer"]), layer_kinds, " ".join(map(str, layer["capacity"])), human_bytes(layer["bytes"]),
                      f"{100 * layer['fraction_of_full']:.1f}", f"{layer['expected_recovery']:.3f}")
    console.print(table)
    console.print(KIND_LEGEND, style="dim")
    console.print(
        f"cache {human_bytes(plan.cache_bytes)} (keys and values {human_bytes(plan.kv_bytes)}, "
        f"scores {human_bytes(plan.score_bytes)}, positions {human_bytes(plan.position_bytes)}, "
        f"counters and tables {human_bytes(plan.overhead_bytes)}) "
        f"against {human_bytes(plan.full_cache_bytes)} full: {100 * plan.compression:.1f}% · "
        f"expected recovery {report['expected_recovery']:.4f}"
    )
    console.print(sequence_line(report))


def draw_plan(plan: Plan, png) -> Path:
    """Left: slots per (layer, KV head) as a share of max length, kinds written in when they fit;
    right: each layer's bytes as a share of its full cache and its expected recovery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    from kvc.compiler.report import plan_report

    report, max_len = plan_report(plan), plan.target.max_len
    share = (plan.capacity.float() / max_len).clamp(min=1 / max_len).numpy()
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(max(6, plan.num_kv_heads * 0.7 + 6), max(4, plan.num_layers * 0.25)),
        gridspec_kw={"width_ratios": [max(2, plan.num_kv_heads), 4]},
    )
    image = left.imshow(share, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1 / max_len, vmax=1),
                        interpolation="nearest")
    figure.colorbar(image, ax=left, label="slots / max length (log)")
    if plan.num_kv_heads <= 16 and plan.num_layers <= 48:
        for layer in report["layers"]:
            for head, kind in enumerate(layer["kinds"]):
                left.text(head, layer["layer"], short_kind(kind), ha="center", va="center", fontsize=6,
                          color="white" if share[layer["layer"], head] < 0.1 else "black")
    left.set_xlabel("KV head")
    left.set_ylabel("layer")
    left.set_title("budget per head")
    layers = range(plan.num_layers)
    right.barh(layers, [100 * layer["fraction_of_full"] for layer in report["layers"]], color="#4c72b0")
    right.invert_yaxis()
    right.set_xlabel("% of the layer's full cache", color="#4c72b0")
    recovery = right.twiny()
    recovery.plot([layer["expected_recovery"] for layer in report["layers"]], layers, color="#c44e52", marker=".")
    recovery.set_xlabel("expected recovery", color="#c44e52")
    figure.suptitle(f"{plan.model_name}: {plan.strategy or 'plan'}, {100 * plan.compression:.1f}% of the full cache, "
                    f"expected recovery {report['expected_recovery']:.3f}")
    return _save_figure(figure, png)
