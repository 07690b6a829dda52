"""The policy artifact: what was measured about a model's attention heads.

A policy records measurements, never deployment wishes: the model it belongs to (with a
fingerprint), how it was profiled, the token classes, and per layer and KV head the
FastGen choice, its recovery and recovery curves. It is YAML (JSON accepted), versioned
(`kvc_policy: 1`), validated with path-qualified messages and written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from kvc.files import atomic_write_bytes, atomic_write_text  # noqa: F401 (re-exported: their old home)
from kvc.policies.errors import KvcError
from kvc.policies.fields import REQUIRED, FieldReader, check_integer, check_number
from kvc.policies.kinds import FASTGEN_POLICIES, kind_components
from kvc.policies.limits import MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, MAX_LEN, MAX_VOCAB
from kvc.policies.structured import parse_json, parse_yaml, read_input, shown

SCHEMA_VERSION = 1
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass
class ModelInfo:
    name: str
    fingerprint: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    source: str = ""
    architecture: str = ""
    max_position_embeddings: int = 0
    vocab_size: int = 0


@dataclass
class ProfileInfo:
    prompt_set: str = ""
    prompt_count: int = 0
    token_counts: list[int] = field(default_factory=list)
    prompt_hash: str = ""
    threshold: float = 0.95
    local_ratio: float = 0.3
    frequency_ratio: float = 0.3
    sinks: int = 4
    probe_scheme: str = ""
    dtype: str = ""
    device: str = ""
    seconds: float = 0.0
    retrieval_scheme: str = ""
    copy_events: int = 0
    context_probe_scheme: str = ""


@dataclass
class TokenSets:
    special: list[int] = field(default_factory=list)
    punctuation: list[int] = field(default_factory=list)


@dataclass
class Curve:
    """Recovery at budget points: fractions of the length, or token counts for windows."""

    points: list[float]
    recovery: list[float]


@dataclass
class QueryHeadProfile:
    index: int
    kind: str
    recovery: float
    fastgen: dict[str, float] = field(default_factory=dict)
    sink_mass: float = 0.0
    retrieval: float | None = None  # attention on the copied token at copy events; None: not measured


@dataclass
class HeadProfile:
    """One KV head: its FastGen choice and what every alternative would recover."""

    index: int
    kind: str
    components: list[str]
    recovery: float
    fastgen: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Curve] = field(default_factory=dict)
    window_curves: dict[str, Curve] = field(default_factory=dict)
    sink_mass: float = 0.0
    punct_fraction: float = 0.0
    special_fraction: float = 0.0
    retrieval: float | None = None  # the highest of its query heads' retrieval scores
    query_heads: list[QueryHeadProfile] = field(default_factory=list)
    # Under the reconstruction probe, the share of a context's keys (`recovery`) scoring at least each
    # score (`points`): how many keys the head holds on to (`kvc.profiler.context_probe`). None: not measured.
    probe_curve: Curve | None = None


@dataclass
class LayerProfile:
    index: int
    funnel: float
    heads: list[HeadProfile]
    funnel_curve: Curve | None = None


@dataclass
class Policy:
    model: ModelInfo
    profile: ProfileInfo
    tokens: TokenSets
    layers: list[LayerProfile]
    kvc_policy: int = SCHEMA_VERSION
    kvc_version: str = ""
    created: str = ""

    def to_dict(self) -> dict:
        body = asdict(self)
        ordered = {"kvc_policy": body.pop("kvc_policy"), "kvc_version": body.pop("kvc_version"), "created": body.pop("created")}
        ordered.update(body)
        return ordered

    @classmethod
    def from_dict(cls, data) -> "Policy":
        return _parse_policy(data)

    def save(self, path) -> Path:
        return save_policy(self, path)

    @classmethod
    def load(cls, path) -> "Policy":
        return load_policy(path)

    def head(self, layer: int, kv_head: int) -> HeadProfile:
        return self.layers[layer].heads[kv_head]


# ---------------------------------------------------------------- validation

def _token_ids(values, where: str, vocab_size: int) -> list[int]:
    """Token ids below the model's vocabulary size (below MAX_VOCAB when the policy does not record it)."""
    if not isinstance(values, list):
        raise KvcError(f"{where}: expected a list of token ids, got {type(values).__name__}")
    limit = vocab_size or MAX_VOCAB
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KvcError(f"{where}[{i}]: expected a token id (integer >= 0), got {shown(value)}")
        if value >= limit:
            raise KvcError(f"{where}[{i}]: id {shown(value)} is outside the vocabulary of {limit} tokens"
                           + (" (model.vocab_size)" if vocab_size else ""))
    return list(values)


def _parse_curve(data, where: str, high: float = 1.0) -> Curve:
    """Recovery at one or more strictly increasing points in [0, high], each recovery in [0, 1]."""
    reader = FieldReader(data, where)
    points = [check_number(p, f"{where}.points[{i}]", 0, high) for i, p in enumerate(reader.sequence("points"))]
    recovery = [check_number(r, f"{where}.recovery[{i}]", 0.0, 1.0) for i, r in enumerate(reader.sequence("recovery"))]
    if not points:
        raise KvcError(f"{where}.points: empty; a curve needs at least one point")
    if len(points) != len(recovery):
        raise KvcError(f"{where}: {len(points)} points but {len(recovery)} recovery values")
    if any(b <= a for a, b in zip(points, points[1:])):
        raise KvcError(f"{where}.points: must be strictly increasing")
    return Curve(points=points, recovery=recovery)


def _parse_curves(reader: FieldReader, key: str, high: float) -> dict[str, Curve]:
    curves = reader.mapping(key, default={})
    result = {}
    for kind, curve in curves.data.items():
        where = curves.where(kind)
        _checked_kind(kind, where)
        result[kind] = _parse_curve(curve, where, high)
    return result


def _checked_kind(kind, where: str) -> tuple[str, ...]:
    try:
        return kind_components(kind)
    except KvcError as error:
        raise KvcError(f"{where}: {error}") from None


def _parse_fastgen(reader: FieldReader) -> dict[str, float]:
    table = reader.mapping("fastgen", default={})
    result = {}
    for kind, value in table.data.items():
        where = table.where(kind)
        if kind not in FASTGEN_POLICIES:
            raise KvcError(f"{where}: not a FastGen policy (expected one of {', '.join(FASTGEN_POLICIES)})")
        result[kind] = check_number(value, where, 0.0, 1.0)
    return result


def _parse_query_head(data, where: str) -> QueryHeadProfile:
    reader = FieldReader(data, where)
    kind = reader.string("kind")
    _checked_kind(kind, f"{where}.kind")
    return QueryHeadProfile(
        index=reader.integer("index"),
        kind=kind,
        recovery=reader.number("recovery", low=0.0, high=1.0),
        fastgen=_parse_fastgen(reader),
        sink_mass=reader.number("sink_mass", default=0.0, low=0.0, high=1.0),
        retrieval=reader.optional_number("retrieval", low=0.0, high=1.0),
    )


def _parse_head(data, where: str, group: int) -> HeadProfile:
    reader = FieldReader(data, where)
    kind = reader.string("kind")
    components = _checked_kind(kind, f"{where}.kind")
    listed = reader.sequence("components", default=list(components))
    if not all(isinstance(c, str) for c in listed) or sorted(listed) != sorted(components):
        raise KvcError(f"{where}.components: {shown(listed)} does not match kind {kind!r} (expected {list(components)})")
    query_heads = [_parse_query_head(q, f"{where}.query_heads[{i}]") for i, q in enumerate(reader.sequence("query_heads", default=[]))]
    probe_curve = reader.optional("probe_curve")
    if query_heads and len(query_heads) != group:
        raise KvcError(f"{where}.query_heads: expected {group} query heads per KV head, got {len(query_heads)}")
    return HeadProfile(
        index=reader.integer("index"),
        kind=kind,
        components=list(components),
        recovery=reader.number("recovery", low=0.0, high=1.0),
        fastgen=_parse_fastgen(reader),
        curves=_parse_curves(reader, "curves", high=1.0),  # fractions of the length
        window_curves=_parse_curves(reader, "window_curves", high=MAX_LEN),  # token counts
        sink_mass=reader.number("sink_mass", default=0.0, low=0.0, high=1.0),
        punct_fraction=reader.number("punct_fraction", default=0.0, low=0.0, high=1.0),
        special_fraction=reader.number("special_fraction", default=0.0, low=0.0, high=1.0),
        retrieval=reader.optional_number("retrieval", low=0.0, high=1.0),
        query_heads=query_heads,
        probe_curve=None if probe_curve is None else _parse_curve(probe_curve, f"{where}.probe_curve"),
    )


def _parse_layer(data, where: str, model: ModelInfo) -> LayerProfile:
    reader = FieldReader(data, where)
    heads_data = reader.sequence("heads")
    if len(heads_data) != model.num_kv_heads:
        raise KvcError(f"{where}.heads: expected {model.num_kv_heads} KV heads for this model, got {len(heads_data)}")
    group = model.num_attention_heads // model.num_kv_heads
    heads = [_parse_head(h, f"{where}.heads[{i}]", group) for i, h in enumerate(heads_data)]
    for i, head in enumerate(heads):
        if head.index != i:
            raise KvcError(f"{where}.heads[{i}].index: expected {i}, got {head.index}")
    curve = reader.optional("funnel_curve")
    return LayerProfile(
        index=reader.integer("index"),
        funnel=reader.number("funnel", low=0.0, high=1.0),
        heads=heads,
        funnel_curve=None if curve is None else _parse_curve(curve, f"{where}.funnel_curve"),
    )


def _parse_model(reader: FieldReader) -> ModelInfo:
    model = ModelInfo(
        name=reader.string("name"),
        fingerprint=reader.string("fingerprint"),
        num_layers=reader.integer("num_layers", minimum=1, maximum=MAX_LAYERS),
        num_attention_heads=reader.integer("num_attention_heads", minimum=1, maximum=MAX_HEADS),
        num_kv_heads=reader.integer("num_kv_heads", minimum=1, maximum=MAX_HEADS),
        head_dim=reader.integer("head_dim", minimum=1, maximum=MAX_HEAD_DIM),
        source=reader.string("source", default=""),
        architecture=reader.string("architecture", default=""),
        max_position_embeddings=reader.integer("max_position_embeddings", default=0, maximum=MAX_LEN),
        vocab_size=reader.integer("vocab_size", default=0, maximum=MAX_VOCAB),
    )
    if model.num_attention_heads % model.num_kv_heads:
        raise KvcError(
            f"model.num_attention_heads: {model.num_attention_heads} is not a multiple of num_kv_heads {model.num_kv_heads}"
        )
    return model


def _parse_profile(reader: FieldReader) -> ProfileInfo:
    counts = reader.sequence("token_counts", default=[])
    return ProfileInfo(
        prompt_set=reader.string("prompt_set", default=""),
        prompt_count=reader.integer("prompt_count", default=0),
        token_counts=[check_integer(c, reader.where(f"token_counts[{i}]"), maximum=MAX_LEN) for i, c in enumerate(counts)],
        prompt_hash=reader.string("prompt_hash", default=""),
        threshold=reader.number("threshold", default=0.95, low=0.0, high=1.0),
        local_ratio=reader.number("local_ratio", default=0.3, low=0.0, high=1.0),
        frequency_ratio=reader.number("frequency_ratio", default=0.3, low=0.0, high=1.0),
        sinks=reader.integer("sinks", default=4, maximum=MAX_LEN),
        probe_scheme=reader.string("probe_scheme", default=""),
        dtype=reader.string("dtype", default=""),
        device=reader.string("device", default=""),
        seconds=reader.number("seconds", default=0.0, low=0.0),
        retrieval_scheme=reader.string("retrieval_scheme", default=""),
        copy_events=reader.integer("copy_events", default=0),
        context_probe_scheme=reader.string("context_probe_scheme", default=""),
    )


def _parse_policy(data) -> Policy:
    reader = FieldReader(data, "")
    version = reader.get("kvc_policy", REQUIRED)
    if version != SCHEMA_VERSION:
        raise KvcError(f"kvc_policy: unsupported schema version {version!r} (this kvc reads version {SCHEMA_VERSION})")
    model = _parse_model(reader.mapping("model"))
    tokens = reader.mapping("tokens")
    layers_data = reader.sequence("layers")
    if len(layers_data) != model.num_layers:
        raise KvcError(f"layers: expected {model.num_layers} layers (model.num_layers), got {len(layers_data)}")
    layers = [_parse_layer(layer, f"layers[{i}]", model) for i, layer in enumerate(layers_data)]
    for i, layer in enumerate(layers):
        if layer.index != i:
            raise KvcError(f"layers[{i}].index: expected {i}, got {layer.index}")
    return Policy(
        kvc_policy=SCHEMA_VERSION,
        kvc_version=_scalar_text(reader, "kvc_version"),
        created=_scalar_text(reader, "created"),
        model=model,
        profile=_parse_profile(reader.mapping("profile", default={})),
        tokens=TokenSets(
            special=_token_ids(tokens.get("special"), "tokens.special", model.vocab_size),
            punctuation=_token_ids(tokens.get("punctuation"), "tokens.punctuation", model.vocab_size),
        ),
        layers=layers,
    )


def _scalar_text(reader: FieldReader, key: str) -> str:
    """A free-text field as a string; YAML reads an unquoted date as a datetime, so any scalar goes."""
    value = reader.get(key, "")
    if isinstance(value, (list, dict)):
        raise KvcError(f"{reader.where(key)}: expected a string, got a {type(value).__name__}")
    return str(value)


# ---------------------------------------------------------------- files

def read_structured(path, what: str = "file") -> dict:
    """Read a YAML or JSON file into a mapping within kvc's bounds, with one clear error for anything else."""
    path = Path(path)
    raw = read_input(path, what)
    if not raw.strip():
        raise KvcError(f"{path}: the {what} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KvcError(f"{path}: not a text file (binary data); expected YAML or JSON") from None
    if "\x00" in text:
        raise KvcError(f"{path}: not a text file (binary data); expected YAML or JSON")
    try:
        data = parse_json(text) if path.suffix.lower() == ".json" else parse_yaml(text)
    except KvcError as error:
        raise KvcError(f"{path}: {error}") from None
    if not isinstance(data, dict):
        raise KvcError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def dump_policy(policy: Policy, fmt: str = "yaml") -> str:
    data = policy.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=1) + "\n"
    return yaml.dump(data, Dumper=_YAML_DUMPER, sort_keys=False, width=120)


def save_policy(policy: Policy, path) -> Path:
    """Save as JSON if the name ends in .json, YAML otherwise; atomically."""
    path = Path(path)
    _parse_policy(policy.to_dict())
    return atomic_write_text(path, dump_policy(policy, "json" if path.suffix.lower() == ".json" else "yaml"))


def load_policy(path) -> Policy:
    """Load and validate a policy; errors name the file and the path inside it."""
    data = read_structured(path, "policy file")
    try:
        return _parse_policy(data)
    except KvcError as error:
        raise KvcError(f"{path}: {error}") from None

