"""The compiled plan: everything the runtime needs and nothing it must decide.

Per (layer, KV head): a kind bitmask and the slots each component may use (sinks, special and
punctuation slots, heavy hitters, recent window), whose sum is the head's static capacity; the
per-layer offsets of a flat memory layout; the token-class bitmap; the target it was compiled
for, the model fingerprint, and how a slot stores its key and value (in the target dtype, or as
`kv_bits`-bit rows with float16 group parameters; `row_bytes` and `slot_bytes` are the one
place either is counted). Stored as one safetensors file (tensors plus a JSON header),
written atomically and loaded in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kvc.policies.errors import KvcError
from kvc.policies.kinds import KIND_BITS
from kvc.policies.probes import POOL_KERNEL
from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT
from kvc.policies.schema import atomic_write_bytes

PLAN_VERSION = 1
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SCORE_BYTES = 4  # one float32 accumulated-attention score per slot of a frequency head
POSITION_BYTES = 4  # one int32 token position per slot of every head (ring order, eviction, masks)
QUANT_BITS = (2, 4, 8)  # low-bit K/V widths (0: the plan's dtype)
QUANT_GROUP = 32  # channels sharing one float16 step and minimum
QUANT_PARAM_BYTES = 4  # float16 step + float16 minimum per group
COUNTER_BYTES = 4  # int32 sequence state the runtime keeps beside the slots:
HEAD_COUNTERS = 2  # per (sequence, layer, KV head): class tokens and window tokens admitted (ring pointers)
SEQUENCE_COUNTERS = 2  # per (sequence, layer): tokens seen and the first position after the padding
LAYOUT_FIELDS = 12  # int64 columns of the runtime's per-layer head table (kvc.runtime.layout.FIELDS)


def quant_group(head_dim: int) -> int:
    """Channels per quantisation group: QUANT_GROUP where it divides head_dim, else the whole vector."""
    return QUANT_GROUP if head_dim % QUANT_GROUP == 0 else head_dim


def quant_row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one low-bit row: `bits`-bit codes plus each group's float16 step and minimum."""
    return head_dim * bits // 8 + head_dim // quant_group(head_dim) * QUANT_PARAM_BYTES


def row_bytes(head_dim: int, dtype: str, bits: int = 0) -> int:
    """Bytes of one cached key (or value) vector: head_dim in `dtype`, or a low-bit row."""
    return quant_row_bytes(head_dim, bits) if bits else head_dim * DTYPE_BYTES[dtype]


def check_kv_bits(kv_bits, head_dim: int) -> None:
    """One error unless kv_bits is 0 or a QUANT_BITS width whose codes fill whole bytes of a row."""
    if isinstance(kv_bits, bool) or kv_bits not in (0, *QUANT_BITS):
        raise KvcError(f"--kv-bits: expected one of {', '.join(map(str, QUANT_BITS))} (or 0: the cache dtype), "
                       f"got {kv_bits!r}")
    if kv_bits and head_dim * kv_bits % 8:
        raise KvcError(f"--kv-bits {kv_bits}: a head dim of {head_dim} does not pack into whole bytes; "
                       "use --kv-bits 8")


def state_bytes(num_layers: int, num_kv_heads: int, batch: int) -> int:
    """Bytes of the per-sequence counters the runtime keeps for every layer and KV head."""
    return num_layers * (num_kv_heads * HEAD_COUNTERS + SEQUENCE_COUNTERS) * COUNTER_BYTES * batch


def class_members(token_classes: torch.Tensor) -> int:
    """How many int32 ids the runtime keeps to look token classes up: the special and the punctuation tokens."""
    return int(((token_classes & SPECIAL_BIT) != 0).sum() + ((token_classes & PUNCT_BIT) != 0).sum())


def table_bytes(num_layers: int, num_kv_heads: int, head_dim: int, class_ids: int, kv_bits: int) -> int:
    """Bytes of the tables a cache holds once: the class tokens' ids, per-layer head tables, the row rotation."""
    rotation = head_dim * head_dim * 4 if kv_bits else 0
    return class_ids * 4 + num_layers * num_kv_heads * LAYOUT_FIELDS * 8 + rotation


def slot_bytes(head_dim: int, dtype: str, bits: int = 0, frequency=False):
    """Bytes of one slot for one sequence: key and value rows, the position and, on frequency heads,
    the score. `frequency` may be a bool or an integer tensor (then so is the answer)."""
    return 2 * row_bytes(head_dim, dtype, bits) + POSITION_BYTES + SCORE_BYTES * frequency


# (layers, kv_heads) int32 tables, in the order they are stored.
HEAD_TABLES = ("kind_codes", "sinks", "class_slots", "heavy", "window", "full_slots")


@dataclass
class Target:
    max_len: int
    batch: int = 1
    dtype: str = "bfloat16"
    budget_bytes: int = 0
    fraction: float = 1.0


@dataclass
class Plan:
    """Static per-head budgets for one model and one deployment target.

    Head tables are int32 tensors of shape (layers, kv_heads). A head's capacity is
    sinks + class_slots + heavy + window + full_slots; full heads use only full_slots (= max_len).
    """

    model_name: str
    fingerprint: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    target: Target
    kind_codes: torch.Tensor
    sinks: torch.Tensor
    class_slots: torch.Tensor
    heavy: torch.Tensor
    window: torch.Tensor
    full_slots: torch.Tensor
    token_classes: torch.Tensor  # (vocab,) uint8: bit 1 special, bit 2 punctuation
    expected_recovery: torch.Tensor  # (layers, kv_heads) float32, from the policy's curves
    strategy: str = ""
    observation_window: int = 32
    pool_kernel: int = POOL_KERNEL
    kv_bits: int = 0  # 0: keys and values in the target dtype; else low-bit rows (QUANT_BITS)
    merge_similarity: float | None = None  # None: evicted prompt tokens dropped; else merged (kvc.runtime.merging)
    notes: dict = field(default_factory=dict)

    # ------------------------------------------------------------ derived layout
    @property
    def capacity(self) -> torch.Tensor:
        """(layers, kv_heads) slots per head."""
        return self.sinks + self.class_slots + self.heavy + self.window + self.full_slots

    @property
    def offsets(self) -> torch.Tensor:
        """(layers, kv_heads) first slot of each head in its layer's flat buffer."""
        capacity = self.capacity.to(torch.int64)
        return torch.cumsum(capacity, dim=1) - capacity

    @property
    def layer_slots(self) -> torch.Tensor:
        """(layers,) total slots of each layer's flat buffer."""
        return self.capacity.to(torch.int64).sum(dim=1)

    def has(self, component: str) -> torch.Tensor:
        """(layers, kv_heads) bool: which heads include a basic kind."""
        return (self.kind_codes & KIND_BITS[component]) != 0

    # ------------------------------------------------------------ memory accounting
    def head_bytes(self) -> torch.Tensor:
        """(layers, kv_heads) int64 bytes each head takes (keys, values, positions, scores); they sum to cache_bytes."""
        slot = slot_bytes(self.head_dim, self.target.dtype, self.kv_bits, self.has("frequency").to(torch.int64))
        return self.capacity.to(torch.int64) * slot * self.target.batch

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values the cache holds, for the whole batch."""
        row = row_bytes(self.head_dim, self.target.dtype, self.kv_bits)
        return int(self.layer_slots.sum()) * 2 * row * self.target.batch

    @property
    def score_bytes(self) -> int:
        """Bytes of accumulated-attention scores kept for frequency heads."""
        slots = int((self.capacity * self.has("frequency")).sum())
        return slots * SCORE_BYTES * self.target.batch

    @property
    def position_bytes(self) -> int:
        """Bytes of the per-slot token positions every head keeps."""
        return int(self.layer_slots.sum()) * POSITION_BYTES * self.target.batch

    @property
    def table_bytes(self) -> int:
        """Bytes of the tables the runtime holds once, whatever the batch."""
        return table_bytes(self.num_layers, self.num_kv_heads, self.head_dim, class_members(self.token_classes),
                           self.kv_bits)

    @property
    def overhead_bytes(self) -> int:
        """Bytes beside the slots: sequence counters and the tables the runtime holds."""
        return state_bytes(self.num_layers, self.num_kv_heads, self.target.batch) + self.table_bytes

    def cache_bytes_at(self, batch: int) -> int:
        """What a cache of `batch` sequences holds: per-sequence bytes scale with the batch, tables do not."""
        per_batch = self.cache_bytes - self.table_bytes
        return per_batch * batch // self.target.batch + self.table_bytes

    @property
    def cache_bytes(self) -> int:
        """Everything the runtime allocates for this plan; `CompressedCache.nbytes()` equals it."""
        return self.kv_bytes + self.score_bytes + self.position_bytes + self.overhead_bytes

    @property
    def full_cache_bytes(self) -> int:
        """What a full cache of max_len tokens would take in the same dtype and batch."""
        width = DTYPE_BYTES[self.target.dtype]
        return self.num_layers * self.num_kv_heads * self.target.max_len * self.head_dim * 2 * width * self.target.batch

    @property
    def compression(self) -> float:
        return self.cache_bytes / self.full_cache_bytes

    def slice_heads(self, first: int, count: int) -> "Plan":
        """The plan of KV heads first..first+count-1 alone: what one tensor-parallel rank holds."""
        if not (0 <= first and count > 0 and first + count <= self.num_kv_heads):
            raise KvcError(f"KV heads {first}..{first + count - 1}: the plan has {self.num_kv_heads}")
        group = self.num_attention_heads // self.num_kv_heads
        heads = slice(first, first + count)
        tables = {name: getattr(self, name)[:, heads].clone() for name in (*HEAD_TABLES, "expected_recovery")}
        return replace(self, num_kv_heads=count, num_attention_heads=count * group, **tables)

    @property
    def tensor_parallel_size(self) -> int:
        """The ranks the plan's budget was balanced over (`kvc compile --tensor-parallel-size`; 1: none)."""
        return int(self.notes.get("tensor_parallel", {}).get("ranks", 1))

    def check_ranks(self, ranks: int) -> None:
        """Refuse tensor-parallel ranks that do not split the KV heads evenly (vLLM gives each rank an
        equal, contiguous range of them)."""
        if self.num_kv_heads % ranks:
            raise KvcError(f"--tensor-parallel-size {ranks} does not divide the plan's {self.num_kv_heads} KV heads")

    def rank_slice(self, rank: int, ranks: int) -> "Plan":
        """The heads tensor-parallel rank `rank` of `ranks` holds."""
        self.check_ranks(ranks)
        count = self.num_kv_heads // ranks
        return self if ranks == 1 else self.slice_heads(rank * count, count)

    # ------------------------------------------------------------ checks
    def check_model(self, model_fingerprint: str) -> None:
        if model_fingerprint != self.fingerprint:
            raise KvcError(
                f"this plan was compiled for {self.model_name} (fingerprint {self.fingerprint}), "
                f"not for the model given (fingerprint {model_fingerprint}); profile and compile for this model"
            )

    def check_geometry(self, config) -> None:
        """Refuse a model (transformers config) whose layers, heads, head dim, vocabulary, context
        or layer types differ from this plan's; the error names the field."""
        from kvc.plan_checks import check_geometry

        check_geometry(self, config)

    def check_length(self, length: int) -> None:
        if length > self.target.max_len:
            raise KvcError(
                f"the sequence needs {length} tokens but the plan was compiled for --max-len {self.target.max_len}; "
                f"recompile with `kvc compile POLICY --max-len {length}` or more"
            )

    # ------------------------------------------------------------ files
    def header(self) -> dict:
        return {
            "kvc_plan": PLAN_VERSION,
            "model": {
                "name": self.model_name, "fingerprint": self.fingerprint, "num_layers": self.num_layers,
                "num_attention_heads": self.num_attention_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
            },
            "target": vars(self.target),
            "strategy": self.strategy,
            "observation_window": self.observation_window,
            "pool_kernel": self.pool_kernel,
            "kv_bits": self.kv_bits,
            "merge_similarity": self.merge_similarity,
            "notes": self.notes,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        tables = {name: getattr(self, name).to(torch.int32).contiguous() for name in HEAD_TABLES}
        tables["token_classes"] = self.token_classes.to(torch.uint8).contiguous()
        tables["expected_recovery"] = self.expected_recovery.to(torch.float32).contiguous()
        return tables

    def save(self, path) -> Path:
        """Write the plan atomically; a plan that would not load is refused and nothing is written."""
        from safetensors.torch import save

        from kvc.plan_checks import plan_from_parts

        header, tensors = json.dumps(self.header()), self.tensors()
        plan_from_parts(json.loads(header), tensors)
        return atomic_write_bytes(path, save(tensors, metadata={"kvc_plan": header}))

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan file, refusing (one line naming the field) anything inconsistent in it."""
        from kvc.plan_checks import read_plan

        return read_plan(path)
