"""One layer's compressed K/V: the plan's static buffers, filled at prefill, written per decode step.

Buffers (allocated once): keys and values (batch, slots, head_dim) in the plan's dtype, or on a
low-bit plan (batch, slots, row bytes) uint8 rows (`quantize.py`) that attention decodes first;
the token position of every slot (int32) and the accumulated attention of every frequency-head
slot (float32): exactly the plan's accounting. Group counts per (sequence, head) say which slots
are filled. No transformers here: serving engines drive it directly (see `standalone.py`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvc.plan import Plan, quant_row_bytes
from kvc.policies.errors import KvcError
from kvc.runtime import kernels, quantize
from kvc.runtime.admission import admit
from kvc.runtime.layout import DTYPES, LayerLayout
from kvc.runtime.selection import keep_groups, packed_indices

KERNEL_CHOICES = ("auto", "triton", "reference")


def kernel_set(device: torch.device, choice: str = "auto") -> SimpleNamespace:
    """The kernels a store calls: Triton on CUDA ('auto'), the torch references elsewhere."""
    if choice not in KERNEL_CHOICES:
        raise KvcError(f"kernels={choice!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    suffix = "triton" if choice == "triton" or (choice == "auto" and device.type == "cuda") else "reference"
    return SimpleNamespace(**{name: getattr(kernels, f"{name}_{suffix}") for name in
                              ("decode_attention", "observation_scores", "gather_into_segments")})


class LayerStore:
    """The compressed cache of one layer for a batch of sequences.

    Slot positions count from the start of the (left-padded) batch: a token at padded index t has
    position t, and its sequence's first real token is at `start[b]`.
    """

    def __init__(self, plan: Plan, layer: int, sliding_window: int | None = None, kernels: str = "auto"):
        self.plan = plan
        self.layer = layer
        self.sliding_window = sliding_window
        self.layout = LayerLayout.from_plan(plan, layer, sliding_window)
        self.dtype = DTYPES[plan.target.dtype]
        self.bits = plan.kv_bits
        self.kernel_choice = kernels
        self.keys = self.values = self.positions = self.scores = None
        self.seen = 0

    # ------------------------------------------------------------ allocation
    @property
    def allocated(self) -> bool:
        return self.keys is not None

    def allocate(self, batch: int, device) -> None:
        """Allocate the static buffers once; a batch smaller than the plan's takes proportionally less."""
        if batch > self.plan.target.batch:
            raise KvcError(f"a batch of {batch} sequences does not fit a plan compiled for batch "
                           f"{self.plan.target.batch}; recompile with `kvc compile POLICY --batch {batch}` or more")
        device = torch.device(device)
        self.layout = self.layout.to(device)
        self.stored_heads = self.layout.stored_heads
        self.decode_layout = self.layout.restricted(self.stored_heads)
        self.kernels = kernel_set(device, self.kernel_choice)
        # On the CPU, testing a swap for a no-op costs less than doing it; on CUDA it would synchronise.
        self.skip_idle_swaps = device.type == "cpu"
        slots, head_dim = self.layout.total_slots, self.plan.head_dim
        row, dtype = (quant_row_bytes(head_dim, self.bits), torch.uint8) if self.bits else (head_dim, self.dtype)
        self.keys = torch.zeros(batch, slots, row, dtype=dtype, device=device)
        self.values = torch.zeros(batch, slots, row, dtype=dtype, device=device)
        self.positions = torch.full((batch, slots), -1, dtype=torch.int32, device=device)
        self.scores = torch.zeros(batch, self.layout.score_slots, dtype=torch.float32, device=device)
        self.counts = torch.zeros(batch, self.layout.num_kv_heads, 4, dtype=torch.int64, device=device)
        self.start = torch.zeros(batch, dtype=torch.int64, device=device)
        self.seen = 0

    def nbytes(self) -> int:
        """Bytes of the slot buffers (K, V, positions, scores); the plan's `cache_bytes` at its batch."""
        if not self.allocated:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions, self.scores))

    @property
    def lengths(self) -> torch.Tensor:
        """(batch, kv_heads) int32 filled slots of each head."""
        return self.counts.sum(-1).to(torch.int32)

    # ------------------------------------------------------------ prefill
    def prefill(self, keys, values, classes, start, query_window=None, scale=None) -> None:
        """Store each head's keep-set of a prompt.

        keys, values (batch, kv_heads, length, head_dim); classes (batch, length) uint8 token-class
        bits; start (batch,) first non-padding position; query_window (batch, q_heads, window,
        head_dim) the last prompt queries, needed when the layer has frequency heads.
        """
        batch, _, length, _ = keys.shape
        self.plan.check_length(length)
        if not self.allocated:
            self.allocate(batch, keys.device)
        if self.seen:
            raise KvcError("this cache already holds a sequence; call reset() before a new prompt")
        layout = self.layout
        scores = None
        if layout.has_frequency:
            assert query_window is not None, "frequency heads need the observation-window queries"
            scores = self.kernels.observation_scores(query_window, keys, start, scale, self.plan.pool_kernel)
        indices, counts = packed_indices(keep_groups(layout, classes, start, scores), layout.max_capacity)
        kept = counts.sum(-1)  # (batch, kv_heads)
        self.kernels.gather_into_segments(self._stored(keys), self._stored(values), indices, kept, layout.offsets,
                                          layout.capacities, self.keys, self.values)
        slot = torch.arange(indices.shape[-1], device=keys.device)
        filled = slot < kept[..., None]  # (batch, kv_heads, kept slots)
        sequence = torch.arange(batch, device=keys.device)[:, None, None].expand_as(filled)
        self.positions.fill_(-1)
        self.positions[sequence[filled], (layout.offsets[:, None] + slot).expand_as(filled)[filled]] = (
            indices[filled].to(torch.int32))
        if scores is not None:
            scored = filled & layout.frequency[:, None]
            self.scores.zero_()
            self.scores[sequence[scored], (layout.score_offsets[:, None] + slot).expand_as(scored)[scored]] = (
                scores.gather(-1, indices)[scored])
        self.counts.copy_(counts)
        self.start.copy_(start)
        self.seen = length

    # ------------------------------------------------------------ decode
    def decode(self, query, key, value, classes, scale=None) -> torch.Tensor:
        """Append one token per sequence, then attend to each head's segment.

        query (batch, q_heads, head_dim); key, value (batch, kv_heads, head_dim); classes (batch,)
        uint8. Returns (batch, q_heads, head_dim) in the query's dtype.
        """
        self.append(key, value, classes)
        return self.attend(query, scale)

    def append(self, key, value, classes) -> None:
        """Write one new token per sequence into each head by its kind (the token is at position `seen`)."""
        assert self.allocated and self.seen > 0, f"layer {self.layer} was not prefilled"
        self.plan.check_length(self.seen + 1)
        layout, heads = self.decode_layout, self.stored_heads
        if not len(heads):  # a layer the plan gave no slots
            self.seen += 1
            return
        admission = admit(layout, self.counts[:, heads],
                          self._segment_view(self.positions, layout.offsets, layout.capacities),
                          self._score_view(), classes, self.seen - self.start)
        rows = torch.arange(key.shape[0], device=key.device)[:, None]
        score_heads = layout.frequency_heads
        slot_base, score_base = layout.offsets, layout.score_offsets[score_heads]
        for first, second in admission.swaps:
            if self.skip_idle_swaps and torch.equal(first, second):
                continue
            _swap((self.keys, self.values, self.positions), rows, slot_base + first, slot_base + second)
            if len(score_heads):
                _swap((self.scores,), rows, score_base + first[:, score_heads], score_base + second[:, score_heads])
        slot, stored = slot_base + admission.slot, admission.stored
        _write(self.keys, rows, slot, stored, self._stored(key[:, heads]))
        _write(self.values, rows, slot, stored, self._stored(value[:, heads]))
        _write(self.positions, rows, slot, stored, torch.full_like(slot, self.seen, dtype=torch.int32))
        if len(score_heads):
            _write(self.scores, rows, score_base + admission.slot[:, score_heads], stored[:, score_heads],
                   torch.zeros(slot.shape[0], len(score_heads), device=slot.device))
        self.counts[:, heads] = admission.counts
        self.seen += 1

    def attend(self, query, scale=None) -> torch.Tensor:
        """Decode attention of (batch, q_heads, head_dim) queries over every head's filled slots."""
        layout = self.layout
        keys, values = (self._readable(buffer, query.dtype) for buffer in (self.keys, self.values))
        args = (query, keys, values, layout.offsets, layout.capacities, self.lengths, scale)
        if not layout.has_frequency:
            return self.kernels.decode_attention(*args)
        output, probs = self.kernels.decode_attention(*args, return_probs=True)
        self.scores += probs[:, layout.frequency_slots]
        return output

    def _stored(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., head_dim) vectors in the buffers' form: the plan's dtype, or low-bit rows."""
        return quantize.encode(vectors, self.bits) if self.bits else vectors.to(self.dtype)

    def _readable(self, buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A K or V buffer as (batch, slots, head_dim) in `dtype`, decoded from low-bit rows if need be."""
        if self.bits:
            return quantize.decode(buffer, self.bits, self.plan.head_dim, dtype)
        return buffer if buffer.dtype == dtype else buffer.to(dtype)

    # ------------------------------------------------------------ bookkeeping
    def reorder(self, sequences: torch.Tensor) -> None:
        """Keep the given sequences in the given order (beam search)."""
        for buffer in (self.keys, self.values, self.positions, self.scores, self.counts, self.start):
            buffer.copy_(buffer.index_select(0, sequences.to(buffer.device)))

    def reset(self) -> None:
        """Forget the sequence, keep the buffers."""
        if self.allocated:
            self.counts.zero_()
            self.positions.fill_(-1)
            self.scores.zero_()
        self.seen = 0

    def kept_positions(self, sequence: int = 0) -> list[torch.Tensor]:
        """Per KV head, the sorted positions (after the sequence's padding) of the tokens it holds."""
        lengths, start = self.lengths[sequence].tolist(), int(self.start[sequence])
        return [torch.sort(self.positions[sequence, offset:offset + length].long() - start).values
                for offset, length in zip(self.layout.offsets.tolist(), lengths)]

    def _segment_view(self, buffer, offsets, capacities):
        """(batch, heads, max_capacity) view of each head's segment (slots past capacity repeat the last)."""
        slots = torch.arange(self.decode_layout.max_capacity, device=buffer.device)
        return buffer[:, offsets[:, None] + torch.minimum(slots, capacities[:, None] - 1)]

    def _score_view(self):
        """Scores as a segment view; heads without scores read score 0 (and never use it)."""
        layout = self.decode_layout
        if not self.layout.has_frequency:
            return None
        return self._segment_view(self.scores, layout.score_offsets, torch.where(layout.frequency, layout.capacities, 1))


def _swap(buffers, rows, first, second):
    """Exchange slots first[b, h] and second[b, h] of every sequence b (pairs of distinct heads never overlap)."""
    destination, source = torch.cat([first, second], 1), torch.cat([second, first], 1)
    for buffer in buffers:
        buffer[rows, destination] = buffer[rows, source]


def _write(buffer, rows, slot, stored, value):
    """buffer[b, slot[b, h]] = value[b, h] where stored[b, h]."""
    current = buffer[rows, slot]
    mask = stored.view(*stored.shape, *([1] * (value.dim() - stored.dim())))
    buffer[rows, slot] = torch.where(mask, value, current)
