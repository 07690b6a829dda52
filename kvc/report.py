"""Show policies and plans to people: rich tables in the terminal, heatmaps in PNG files.

`load_artifact` tells a plan (safetensors) from a policy (YAML/JSON) by its first bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.policies.kinds import FASTGEN_POLICIES, KIND_BITS
from kvc.policies.schema import Policy, atomic_write_bytes, load_policy

KIND_COLOURS = {
    "special": "#4c72b0", "special+punct": "#64b5cd", "special+punct+frequency": "#55a868",
    "special+punct+frequency+local": "#ccb974", "full": "#c44e52",
}


def is_plan_file(path: Path) -> bool:
    """A safetensors file starts with a little-endian u64 header size, then '{'."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def load_artifact(path) -> Policy | Plan:
    path = Path(path)
    if not path.is_file():
        raise KvcError(f"{path}: no such file")
    return Plan.load(path) if is_plan_file(path) else load_policy(path)


def render(artifact, console) -> None:
    (render_plan if isinstance(artifact, Plan) else render_policy)(artifact, console)


def draw(artifact, png) -> Path:
    return (draw_plan if isinstance(artifact, Plan) else draw_policy)(artifact, png)


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
        f"[bold]{model.name}[/] policy · {model.num_layers} layers × {model.num_kv_heads} KV heads "
        f"({model.num_attention_heads} query heads, head dim {model.head_dim}) · fingerprint {model.fingerprint}"
    )
    if profile.prompt_count:
        console.print(
            f"profiled on {profile.prompt_count} prompts of '{profile.prompt_set}' "
            f"({sum(profile.token_counts)} tokens) at threshold {profile.threshold} in {profile.seconds:.0f} s"
        )
    table = Table()
    for column in ("layer", "funnel", "kinds (per KV head)", "recovery"):
        table.add_column(column)
    for layer in policy.layers:
        kinds = "  ".join(head.kind for head in layer.heads)
        recovery = " ".join(f"{head.recovery:.3f}" for head in layer.heads)
        table.add_row(str(layer.index), f"{layer.funnel:.3f}", kinds, recovery)
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

def plan_kind_names(plan: Plan) -> list[list[str]]:
    """(layers, kv_heads) kind names decoded from the plan's bitmasks."""
    names = []
    for row in plan.kind_codes.tolist():
        names.append(["+".join(k for k, bit in KIND_BITS.items() if code & bit) for code in row])
    return names


def render_plan(plan: Plan, console) -> None:
    from rich.table import Table

    target = plan.target
    console.print(
        f"[bold]{plan.model_name}[/] plan · strategy {plan.strategy or '-'} · max len {target.max_len} · "
        f"batch {target.batch} · {target.dtype} · fingerprint {plan.fingerprint}"
    )
    table = Table()
    for column in ("layer", "kinds (per KV head)", "slots", "bytes", "% of full", "expected recovery"):
        table.add_column(column)
    width = plan.head_dim * 2 * {"float32": 4, "bfloat16": 2, "float16": 2}[target.dtype] * target.batch
    full_layer = plan.num_kv_heads * target.max_len * width
    kinds = plan_kind_names(plan)
    for layer in range(plan.num_layers):
        slots = plan.capacity[layer].tolist()
        layer_bytes = sum(slots) * width
        recovery = " ".join(f"{r:.3f}" for r in plan.expected_recovery[layer].tolist())
        table.add_row(str(layer), "  ".join(kinds[layer]), " ".join(map(str, slots)), human_bytes(layer_bytes),
                      f"{100 * layer_bytes / full_layer:.1f}", recovery)
    console.print(table)
    console.print(
        f"cache {human_bytes(plan.cache_bytes)} (keys and values {human_bytes(plan.kv_bytes)}, "
        f"scores {human_bytes(plan.score_bytes)}, positions {human_bytes(plan.position_bytes)}) against {human_bytes(plan.full_cache_bytes)} full: "
        f"{100 * plan.compression:.1f}% · expected recovery {float(plan.expected_recovery.mean()):.3f}"
    )


def draw_plan(plan: Plan, png) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(4, plan.num_kv_heads * 0.8 + 2), max(4, plan.num_layers * 0.22)))
    image = axis.imshow((plan.capacity.float() / plan.target.max_len).numpy(), aspect="auto", cmap="viridis",
                        vmin=0, vmax=1, interpolation="nearest")
    figure.colorbar(image, ax=axis, label="slots / max length")
    axis.set_xlabel("KV head")
    axis.set_ylabel("layer")
    axis.set_title(f"{plan.model_name}: budget per head ({100 * plan.compression:.1f}% of full)")
    return _save_figure(figure, png)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} TiB"
