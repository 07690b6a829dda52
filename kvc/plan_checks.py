"""What a plan must be before anything runs it, and whether it fits the model it is applied to.

A plan file is read in full and checked as a whole: the header's fields typed and bounded
(`kvc.policies.limits`), every table present with the dtype and the shape the header names,
every head consistent (a known kind, slots only for its components, a capacity of at most max_len,
full heads exactly max_len) and the cache it allocates within its stated budget. `check_geometry`
holds the plan against a model's config. Each failure is one `KvcError` naming the field.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvc.plan import DTYPE_BYTES, HEAD_TABLES, PLAN_VERSION, Plan, Target, check_kv_bits
from kvc.policies.errors import KvcError
from kvc.policies.fields import FieldReader
from kvc.policies.kinds import BASIC_KINDS, KIND_BITS
from kvc.policies.limits import (
    MAX_BATCH,
    MAX_CACHE_BYTES,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_LEN,
    MAX_POOL_KERNEL,
    MAX_VOCAB,
)
from kvc.policies.structured import input_file, parse_json, shown
from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT

FULL = KIND_BITS["full"]
# A kind is 'full' alone or any non-empty union of the other basic kinds.
KIND_CODES = {FULL} | set(range(1, FULL))
SLOT_TABLES = HEAD_TABLES[1:]  # all but kind_codes: slots of each component
# Which kind bits a component's slots need (sinks go with special heads, class slots with special or punct).
SLOT_NEEDS = {
    "sinks": KIND_BITS["special"],
    "class_slots": KIND_BITS["special"] | KIND_BITS["punct"],
    "heavy": KIND_BITS["frequency"],
    "window": KIND_BITS["local"],
}
COMPILE_HINT = "compile one with `kvc compile POLICY --out PLAN`"
PLAN_TENSORS = {**{name: torch.int32 for name in HEAD_TABLES}, "expected_recovery": torch.float32,
                "token_classes": torch.uint8}


def read_plan(path) -> Plan:
    """Load a plan file and check all of it; errors start with the file's name."""
    path = input_file(path, "plan file")
    header, tensors = _read_file(path)
    try:
        return plan_from_parts(header, tensors)
    except KvcError as error:
        raise KvcError(f"{path}: {error}") from None


def _read_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys() if name in PLAN_TENSORS}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KvcError(f"{path}: not a readable plan (safetensors says: {reason}); the file is corrupt or "
                       f"truncated, or not a plan; {COMPILE_HINT}") from None
    if "kvc_plan" not in metadata:
        raise KvcError(f"{path}: a safetensors file without kvc's plan header, not a kvc plan; {COMPILE_HINT}")
    try:
        header = parse_json(metadata["kvc_plan"])
    except KvcError as error:
        raise KvcError(f"{path}: the plan header is corrupt: {error}") from None
    if not isinstance(header, dict):
        raise KvcError(f"{path}: the plan header is corrupt: expected a mapping, got {type(header).__name__}")
    return header, tensors


def plan_from_parts(header: dict, tensors: dict[str, torch.Tensor]) -> Plan:
    """A checked Plan from a file's header and tensors."""
    reader = FieldReader(header, "", "plan header")
    version = reader.get("kvc_plan")
    if version != PLAN_VERSION:
        raise KvcError(f"kvc_plan: unsupported plan version {shown(version)} (this kvc reads {PLAN_VERSION})")
    model = reader.mapping("model")
    layers = model.integer("num_layers", minimum=1, maximum=MAX_LAYERS)
    kv_heads = model.integer("num_kv_heads", minimum=1, maximum=MAX_HEADS)
    head_dim = model.integer("head_dim", minimum=1, maximum=MAX_HEAD_DIM)
    heads = model.integer("num_attention_heads", minimum=1, maximum=MAX_HEADS)
    if heads % kv_heads:
        raise KvcError(f"model.num_attention_heads: {heads} is not a multiple of model.num_kv_heads {kv_heads}")
    kv_bits = reader.get("kv_bits", 0)
    try:
        check_kv_bits(kv_bits, head_dim)
    except KvcError as error:
        raise KvcError(str(error).replace("--kv-bits", "kv_bits")) from None
    pool_kernel = reader.integer("pool_kernel", default=7, minimum=1, maximum=MAX_POOL_KERNEL)
    if pool_kernel % 2 == 0:
        raise KvcError(f"pool_kernel: must be odd (keys pooled around a centre), got {pool_kernel}")
    merge_similarity = reader.get("merge_similarity", None)
    if merge_similarity is not None:
        merge_similarity = reader.number("merge_similarity", low=-1.0, high=1.0)
    notes = reader.mapping("notes", default={})
    shape = (layers, kv_heads)
    tables = {name: _tensor(tensors, name, shape) for name in (*HEAD_TABLES, "expected_recovery")}
    plan = Plan(
        model_name=model.string("name"), fingerprint=model.string("fingerprint"), num_layers=layers,
        num_attention_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, target=_target(reader.mapping("target")),
        token_classes=_tensor(tensors, "token_classes", None),
        strategy=reader.string("strategy", default=""),
        observation_window=reader.integer("observation_window", default=32, minimum=1, maximum=MAX_LEN),
        pool_kernel=pool_kernel, kv_bits=kv_bits, merge_similarity=merge_similarity, notes=notes.data, **tables,
    )
    check_plan(plan)
    return plan


def _target(reader: FieldReader) -> Target:
    dtype = reader.string("dtype", default="bfloat16")
    if dtype not in DTYPE_BYTES:
        raise KvcError(f"target.dtype: unknown cache dtype {shown(dtype)} (expected {', '.join(DTYPE_BYTES)})")
    return Target(
        max_len=reader.integer("max_len", minimum=1, maximum=MAX_LEN),
        batch=reader.integer("batch", default=1, minimum=1, maximum=MAX_BATCH),
        dtype=dtype,
        budget_bytes=reader.integer("budget_bytes", default=0, maximum=MAX_CACHE_BYTES),
        fraction=reader.number("fraction", default=1.0, low=0.0),
    )


def _tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int] | None) -> torch.Tensor:
    """The named tensor with its dtype and, for head tables, shape (layers, kv_heads); else 1-D."""
    if name not in tensors:
        raise KvcError(f"tensor {name}: missing")
    tensor, dtype = tensors[name], PLAN_TENSORS[name]
    if tensor.dtype != dtype:
        raise KvcError(f"tensor {name}: expected {str(dtype).removeprefix('torch.')}, "
                       f"got {str(tensor.dtype).removeprefix('torch.')}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise KvcError(f"tensor {name}: shape {tuple(tensor.shape)} does not match the header's "
                       f"(model.num_layers, model.num_kv_heads) = {shape}")
    if shape is None and not (tensor.dim() == 1 and 1 <= len(tensor) <= MAX_VOCAB):
        raise KvcError(f"tensor {name}: expected one entry per token id (1 to {MAX_VOCAB}), "
                       f"got shape {tuple(tensor.shape)}")
    return tensor


def check_plan(plan: Plan) -> None:
    """Every head consistent with its kind and max_len, the tables' sizes, the cache within its budget."""
    max_len = plan.target.max_len
    codes = plan.kind_codes
    known = torch.isin(codes, torch.tensor(sorted(KIND_CODES), dtype=codes.dtype))
    _first_bad(~known, "kind_codes", lambda at: f"{int(codes[at])} is not a kind (a union of "
                                                f"{', '.join(BASIC_KINDS)} as bits {', '.join(map(str, KIND_BITS.values()))})")
    for name in SLOT_TABLES:
        table = getattr(plan, name)
        _first_bad(table < 0, name, lambda at, t=table: f"{int(t[at])} slots (negative)")
        _first_bad(table > max_len, name, lambda at, t=table: f"{int(t[at])} slots, more than target.max_len {max_len}")
    full = codes == FULL
    for name, needs in SLOT_NEEDS.items():
        table = getattr(plan, name)
        _first_bad((table > 0) & ((codes & needs) == 0), name,
                   lambda at, t=table: f"{int(t[at])} slots on a head of kind code {int(codes[at])}, which has no "
                                       "component that uses them")
    _first_bad(full & (plan.full_slots != max_len), "full_slots",
               lambda at: f"a full head has {int(plan.full_slots[at])} slots, not target.max_len {max_len}")
    _first_bad(~full & (plan.full_slots != 0), "full_slots", lambda at: "slots on a head that is not full")
    capacity = plan.capacity.to(torch.int64)
    _first_bad(capacity > max_len, "capacity",
               lambda at: f"{int(capacity[at])} slots in all, more than target.max_len {max_len}")
    recovery = plan.expected_recovery
    _first_bad(~(recovery >= 0) | ~(recovery <= 1), "expected_recovery",
               lambda at: f"{float(recovery[at])} is not a share in [0, 1]")
    unknown = plan.token_classes > (SPECIAL_BIT | PUNCT_BIT)
    if unknown.any():
        token = int(unknown.nonzero()[0, 0])
        raise KvcError(f"tensor token_classes: token {token} has class bits {int(plan.token_classes[token])} "
                       f"(only {SPECIAL_BIT} special and {PUNCT_BIT} punctuation exist)")
    _check_size(plan)


def _first_bad(bad: torch.Tensor, name: str, describe) -> None:
    """Raise for the first head where `bad` holds, naming the table and the head."""
    if bad.any():
        layer, kv_head = (int(i) for i in bad.nonzero()[0])
        raise KvcError(f"tensor {name}: layers[{layer}].heads[{kv_head}]: {describe((layer, kv_head))}")


def _check_size(plan: Plan) -> None:
    target = plan.target
    cache = plan.cache_bytes
    if cache > MAX_CACHE_BYTES:
        raise KvcError(f"the plan's cache takes {cache} bytes, more than kvc's bound of {MAX_CACHE_BYTES} "
                       "(kvc.policies.limits.MAX_CACHE_BYTES)")
    if not target.budget_bytes:
        return  # made by hand, for no budget
    # Plans compiled before kvc counted its counters and tables (overhead_bytes) fit the budget with their slots.
    if cache - plan.overhead_bytes > target.budget_bytes:
        raise KvcError(f"target.budget_bytes: the plan's cache takes {cache} bytes, more than its budget of "
                       f"{target.budget_bytes}")
    full = plan.full_cache_bytes
    if abs(target.budget_bytes - target.fraction * full) > 1 + 1e-8 * full:  # the budget is a rounded share
        share = target.budget_bytes / full
        raise KvcError(f"target.fraction: {target.fraction:g} does not match target.budget_bytes "
                       f"({target.budget_bytes} bytes are {share:.6g} of the full cache)")


def check_geometry(plan: Plan, config) -> None:
    """Refuse a plan whose shape differs from the model's: layers, heads, head dim, vocabulary,
    context length and the layer types behind sliding windows."""
    from kvc.models import architecture

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = architecture(text)
    pairs = (
        ("model.num_layers", plan.num_layers, "num_hidden_layers", arch.num_layers),
        ("model.num_attention_heads", plan.num_attention_heads, "num_attention_heads", arch.num_attention_heads),
        ("model.num_kv_heads", plan.num_kv_heads, "num_key_value_heads", arch.num_kv_heads),
        ("model.head_dim", plan.head_dim, "head_dim", arch.head_dim),
        ("token_classes (vocabulary size)", len(plan.token_classes), "vocab_size", arch.vocab_size),
    )
    for field, planned, name, actual in pairs:
        if planned != actual:
            raise KvcError(f"the plan's {field} is {planned} but the model's {name} is {actual}; "
                           "compile a plan for this model")
    limit = arch.max_position_embeddings
    if limit and plan.target.max_len > limit:
        raise KvcError(f"the plan's target.max_len {plan.target.max_len} is beyond the model's "
                       f"max_position_embeddings {limit}; compile with --max-len {limit} or less")
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and len(layer_types) != plan.num_layers:
        raise KvcError(f"the model's layer_types lists {len(layer_types)} layers but the plan has "
                       f"{plan.num_layers}; compile a plan for this model")
    window = getattr(text, "sliding_window", None)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise KvcError(f"the model's sliding_window is {shown(window)}, not a positive number of tokens")
