"""One layer's compressed K/V: the plan's static buffers, filled at prefill, extended by chunks.

Buffers (allocated once): keys and values side by side, (batch, slots, 2, head_dim) in the plan's
dtype, or on a low-bit plan codes and float16 group parameters (`quantize.Rows`), kept turned; the token
position of every slot (int32, -1 when empty) and the accumulated attention of every
frequency-head slot (float32); per sequence the ring counters of every head, the tokens seen and
where the padding ends. `extend` is the one step for any number of new tokens: the chunk attends
to each head's slots and to itself (causally), then its tokens are admitted by each head's rule
(`admission.py`): one by one in a traced step, which has fixed shapes and no host synchronisation;
eagerly a chunk of several tokens all at once, to the same tokens. No transformers here: serving
engines drive it directly (see `standalone.py`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvc.plan import Plan, quant_group
from kvc.policies.errors import KvcError
from kvc.runtime import kernels, quantize
from kvc.runtime.admission import admit, chunk_writes
from kvc.runtime.layout import DTYPES, LayerLayout
from kvc.runtime.merging import merge_evicted
from kvc.runtime.quantize import Rows
from kvc.runtime.selection import keep_groups, slot_sources

KERNEL_CHOICES = ("auto", "triton", "reference")


def kernel_set(device: torch.device, choice: str = "auto") -> SimpleNamespace:
    """The kernels a store calls: Triton on CUDA ('auto'), the torch references elsewhere."""
    if choice not in KERNEL_CHOICES:
        raise KvcError(f"kernels={choice!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    suffix = "triton" if choice == "triton" or (choice == "auto" and device.type == "cuda") else "reference"
    return SimpleNamespace(**{name: getattr(kernels, f"{name}_{suffix}") for name in
                              ("slot_attention", "observation_scores", "gather_slots")})


def sequence_fields(plan: Plan, layer: int, sliding_window: int | None = None) -> list[tuple[str, torch.dtype, tuple]]:
    """What a layer's store keeps per sequence: (name, dtype, shape without the batch dim), 4-byte
    fields first, so the fields packed back to back in this order stay aligned (a serving engine's page)."""
    layout = LayerLayout.from_plan(plan, layer, sliding_window)
    slots, head_dim, heads = layout.total_slots, plan.head_dim, layout.num_kv_heads
    fields = [("positions", torch.int32, (slots,)), ("scores", torch.float32, (layout.score_slots,)),
              ("counts", torch.int32, (heads, 2)), ("seen", torch.int32, ()), ("start", torch.int32, ())]
    if not plan.kv_bits:
        return [*fields, ("rows", DTYPES[plan.target.dtype], (slots, 2, head_dim))]
    groups = head_dim // quant_group(head_dim)
    return [*fields, ("params", torch.float16, (slots, 2, groups, 2)),
            ("codes", torch.uint8, (slots, 2, head_dim * plan.kv_bits // 8))]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared tables counted once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


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
        # Rows hold values of the plan's dtype; a runtime without kernels for it (onnxruntime's CPU and
        # bfloat16) may hold them in float32 (`dtype`), rounded to the plan's dtype on the way in.
        self.dtype = self.plan_dtype = DTYPES[plan.target.dtype]
        self.bits = plan.kv_bits
        self.kernel_choice = kernels
        self.rows = None
        self.prefilled = False
        self.admit_chunks = True  # eagerly, a chunk's tokens are admitted all at once (False: one by one, as traced)
        # A list: every admission appends the slots it wrote, (batch, n) indices into the rows and
        # positions (`take_writes`), so an engine running on copies of its pages writes back only those.
        self.writes: list[torch.Tensor] | None = None

    # ------------------------------------------------------------ allocation
    @property
    def allocated(self) -> bool:
        return self.rows is not None

    @property
    def keys(self):
        """(batch, slots, head_dim) view of the keys (low-bit: `Rows` of views)."""
        return self._side(0)

    @property
    def values(self):
        return self._side(1)

    def _side(self, side: int):
        if self.bits:
            return Rows(self.rows.codes[:, :, side], self.rows.params[:, :, side])
        return self.rows[:, :, side]

    def allocate(self, batch: int, device) -> None:
        """Allocate the static buffers once; a batch smaller than the plan's takes proportionally less."""
        if batch > self.plan.target.batch:
            raise KvcError(f"a batch of {batch} sequences does not fit a plan compiled for batch "
                           f"{self.plan.target.batch}; recompile with `kvc compile POLICY --batch {batch}` or more")
        buffers = {name: torch.zeros(batch, *shape, dtype=dtype, device=device)
                   for name, dtype, shape in sequence_fields(self.plan, self.layer, self.sliding_window)}
        buffers["positions"].fill_(-1)
        self.attach(buffers)

    def attach(self, buffers: dict[str, torch.Tensor], prefilled: bool = False) -> None:
        """Run on buffers someone else owns (`sequence_fields`, each with a leading batch dim): a serving
        engine's pages. `prefilled` says whether they already hold a prompt's keep-sets."""
        device = buffers["positions"].device
        if self.rows is None or self.layout.table.device != device:
            self.layout = self.layout.to(device)
            self.kernels = kernel_set(device, self.kernel_choice)
            self.rotation = quantize.rotation(self.plan.head_dim, device) if self.bits else None
            # Heads with slots own their writes; the others (a plan may starve some) repeat the first owner's.
            stored = self.layout.stored_heads
            self.writers = None if not stored else (stored[0], len(stored) < self.layout.num_kv_heads)
        self.rows = Rows(buffers["codes"], buffers["params"]) if self.bits else buffers["rows"]  # keys [:, :, 0]
        self.positions, self.scores, self.counts, self.seen, self.start = (
            buffers[name] for name in ("positions", "scores", "counts", "seen", "start"))
        self.prefilled = prefilled

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this store keeps between steps."""
        if not self.allocated:
            return []
        rows = list(self.rows) if self.bits else [self.rows]
        extra = [self.rotation] if self.bits else []
        return [*rows, self.positions, self.scores, self.counts, self.seen, self.start, self.layout.table, *extra]

    def nbytes(self) -> int:
        """Bytes of everything the store holds (its share of the plan's `cache_bytes`)."""
        return storage_bytes(self.held_tensors())

    def filled_slots(self) -> torch.Tensor:
        """(batch, kv_heads) int32 filled slots of each head (diagnostics and tests; not used by the step)."""
        filled = self.positions >= 0
        return torch.stack([filled[:, offset:offset + capacity].sum(-1) for offset, capacity in self.layout.segments],
                           -1).to(torch.int32)

    # ------------------------------------------------------------ prefill
    def prefill(self, keys, values, classes, start, query_window=None, scale=None, scores=None,
                questions_later: bool = False) -> None:
        """Store each head's keep-set of a prompt.

        keys, values (batch, kv_heads, length, head_dim); classes (batch, length) uint8 token-class
        bits; start (batch,) first non-padding position; query_window (batch, q_heads, window,
        head_dim) the last prompt queries, which score the frequency heads' keys, unless `scores`
        (batch, kv_heads, length) float32, pooled, gives those scores (a probe's: `kvc.runtime.probe`);
        questions_later: the prompt is a context its questions will follow (`kvc.runtime.merging`).
        """
        batch, _, length, head_dim = keys.shape
        self.plan.check_length(length)
        if not self.allocated:
            self.allocate(batch, keys.device)
        if self.prefilled:
            raise KvcError("this cache already holds a sequence; call reset() before a new prompt")
        layout = self.layout
        if not layout.has_frequency:
            scores = None
        elif scores is None:
            assert query_window is not None, "frequency heads need the observation-window queries"
            scale = head_dim ** -0.5 if scale is None else scale
            scores = self.kernels.observation_scores(query_window, keys, start, scale, self.plan.pool_kernel)
        groups = keep_groups(layout, classes, start, scores)
        index, counts = slot_sources(layout, groups)
        if scores is not None and self.plan.merge_similarity is not None:
            values = merge_evicted(layout, keys, values, groups, index, start, self.plan.merge_similarity,
                                   questions_later)
        for side, vectors in enumerate((keys, values)):
            self._store_slots(vectors, index, self._buffers(self._side(side)))
        self.scores.zero_()
        positions = index.to(torch.int32)
        if scores is not None:  # every slot's prompt score, 0 in empty slots
            kept = torch.where(index >= 0, scores.gather(-1, index.clamp(min=0)), 0.0)
        for head, (offset, capacity) in enumerate(layout.segments):
            self.positions[:, offset:offset + capacity] = positions[:, head, :capacity]
            if scores is not None and layout.heads[head]["frequency"]:
                first = layout.heads[head]["score_offset"]
                self.scores[:, first:first + capacity] = kept[:, head, :capacity]
        self.counts.copy_(counts)
        self.seen.fill_(length)
        self.start.copy_(start)
        self.prefilled = True

    def _store_slots(self, vectors: torch.Tensor, index: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        """Write the prompt's rows that `index` keeps into the slot buffers. vectors (batch, heads,
        length, head_dim); index as `gather_slots` takes it. Low-bit rows are encoded after the
        gather, each row alone (an empty slot's zero row encodes to zeros), so only the kept tokens
        are turned and quantised, not the whole prompt."""
        layout = self.layout
        if not self.bits:
            self.kernels.gather_slots(self._rounded(vectors), index, layout.segments, buffers[0], layout.table)
            return
        kept = self.kernels.gather_slots(vectors, index, layout.segments, None, layout.table)
        codes, params = quantize.encode(kept, self.bits, self.rotation)
        buffers[0].copy_(codes)
        buffers[1].copy_(params.flatten(-2))

    def _rounded(self, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors as the rows hold them: values of the plan's dtype, in `dtype`."""
        return vectors.to(self.plan_dtype).to(self.dtype)

    def _buffers(self, rows) -> list[torch.Tensor]:
        """The keys' or values' view as (batch, slots, width) row tensors."""
        return [rows.codes, rows.params.flatten(-2)] if self.bits else [rows]

    # ------------------------------------------------------------ extend
    def extend(self, query, keys, values, classes, scale=None) -> torch.Tensor:
        """Attend a chunk of new tokens to the slots and to itself, then admit its tokens.

        query (batch, q_heads, chunk, head_dim); keys, values (batch, kv_heads, chunk, head_dim) after
        RoPE; classes (batch, chunk) uint8. Returns (batch, q_heads, chunk, head_dim) in the query's dtype.
        """
        assert self.prefilled, f"layer {self.layer} was not prefilled"
        chunk, head_dim = query.shape[2:]
        if self.sliding_window is not None and chunk > 1:
            # A sliding layer's window moves with every query: token by token, each sees exactly its window.
            return torch.cat([self.extend(query[:, :, i:i + 1], keys[:, :, i:i + 1], values[:, :, i:i + 1],
                                          classes[:, i:i + 1], scale) for i in range(chunk)], 2)
        scale = head_dim ** -0.5 if scale is None else scale
        # The chunk's rows as the cache will hold them, keys and values side by side, and what attention reads of them.
        both = torch.stack([keys, values], 3)  # (batch, kv_heads, chunk, 2, head_dim)
        if self.bits:
            chunk_rows = quantize.encode(both, self.bits, self.rotation)
            readable = quantize.decode_turned(chunk_rows, self.bits)
            turned_query = quantize.turn(query, self.rotation)
        else:
            chunk_rows = self._rounded(both)
            readable = chunk_rows.float()
            turned_query = query.float()
        output, own_scores = self._attend(turned_query, readable[..., 0, :], readable[..., 1, :], scale)
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if self.writers is not None and chunk > 1 and self.admit_chunks and not traced:
            self._admit_chunk(chunk_rows, classes, own_scores)  # eagerly: every head's survivors at once
        elif self.writers is not None:  # traced: fixed shapes, one token at a time
            for index in range(chunk):
                self._admit(index, chunk_rows, classes[:, index],
                            None if own_scores is None else own_scores[:, :, index])
        self.seen += chunk
        if self.bits:
            output = quantize.turn_back(output, self.rotation)
        return output.to(query.dtype)

    def _attend(self, query, chunk_keys, chunk_values, scale):
        """The chunk's attention to itself (causal) and to the slots, merged by log-sum-exp.

        query (batch, q_heads, chunk, head_dim) float32 (turned on a low-bit plan); chunk_keys and
        chunk_values (batch, kv_heads, chunk, head_dim) as the cache stores them. Returns the output
        and, on a layer with frequency heads (whose slot scores it accumulates), the attention each
        chunk token received (batch, kv_heads, chunk).
        """
        batch, q_heads, chunk, head_dim = query.shape
        kv_heads = chunk_keys.shape[1]
        group, layout = q_heads // kv_heads, self.layout
        grouped = query.reshape(batch, kv_heads, group, chunk, head_dim)
        own = grouped @ chunk_keys[:, :, None].transpose(-1, -2) * scale  # (batch, kv_heads, group, chunk, chunk)
        if chunk == 1:  # a lone token's softmax over itself is 1
            own_weights, own_lse = torch.ones_like(own), own[..., 0]
            own_output = chunk_values[:, :, None].expand(batch, kv_heads, group, 1, head_dim)
        else:
            causal = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).tril()
            own_weights, own_lse = kernels.softmax_with_lse(own.masked_fill(~causal, float("-inf")))
            own_output = own_weights @ chunk_values[:, :, None]
        own_output = own_output.reshape(batch, q_heads, chunk, head_dim)
        own_lse = own_lse.reshape(batch, q_heads, chunk)
        attended = self.kernels.slot_attention(
            query, self.keys, self.values, self.positions, layout.segments, scale, self.bits,
            extra_lse=own_lse, return_probs=layout.has_frequency, table=layout.table)
        slot_output, slot_lse = attended[0], attended[1]
        lse = torch.logaddexp(slot_lse, own_lse)
        output = torch.exp(slot_lse - lse)[..., None] * slot_output + torch.exp(own_lse - lse)[..., None] * own_output
        if not layout.has_frequency:
            return output, None
        self._accumulate(attended[2])
        share = torch.exp(own_lse - lse).reshape(batch, kv_heads, group, chunk, 1)
        return output, (own_weights * share).sum((2, 3))

    def _accumulate(self, probs: torch.Tensor) -> None:
        """Add the chunk's attention to the accumulated score of every frequency-head slot."""
        # The frequency heads' score regions follow one another in head order: one add over all of them
        # (a compiled step then reads the sums as one buffer rather than a select per head).
        spans = [self.layout.segments[head] for head in self.layout.frequency_heads]  # (offset, capacity)
        self.scores += torch.cat([probs[:, offset:offset + capacity] for offset, capacity in spans], 1)

    def _admit(self, index, chunk_rows, classes, own_scores) -> None:
        """Write token `index` of the chunk into every head by its kind."""
        layout = self.layout
        relative = self.seen + index - self.start
        admission = admit(layout, self.counts, self.positions, self.scores if layout.has_frequency else None,
                          classes, relative)
        sequences = torch.arange(classes.shape[0], device=classes.device)[:, None]
        token = [chunk_rows.codes[:, :, index], chunk_rows.params[:, :, index]] if self.bits else [chunk_rows[:, :, index]]
        rows = [*zip(list(self.rows) if self.bits else [self.rows], token),
                (self.positions, (self.seen + index)[:, None].expand_as(admission.slot))]
        owners = layout.column("capacity") > 0
        first, some_idle = self.writers
        writer = (owners, first) if some_idle else None
        if self.writes is not None:
            moved_to = [] if admission.moved is None else [admission.move_to]
            self.writes.extend(_owned(slot, writer) for slot in (admission.slot, *moved_to))
        scored = owners & (layout.column("frequency") > 0)
        scorer = (scored, layout.frequency_heads[0]) if layout.has_frequency else None
        if admission.moved is not None:
            for buffer, _ in rows:
                _write(buffer, sequences, admission.move_to, admission.moved, buffer[sequences, admission.move_from],
                       writer)
            moved_score = self.scores[sequences, _score_index(layout, admission.move_from)]
            _write(self.scores, sequences, _score_index(layout, admission.move_to), admission.moved, moved_score,
                   scorer)
        for buffer, value in rows:
            _write(buffer, sequences, admission.slot, admission.stored, value, writer)
        if own_scores is not None:
            _write(self.scores, sequences, _score_index(layout, admission.slot), admission.stored, own_scores, scorer)
        self.counts.copy_(admission.counts)

    def _admit_chunk(self, chunk_rows, classes, own_scores) -> None:
        """Write what each head keeps of the whole chunk (`chunk_writes`): the tokens `_admit` keeps
        token by token, with a few tensor operations per head instead of per token."""
        rows = list(self.rows) if self.bits else [self.rows]
        new_rows = list(chunk_rows) if self.bits else [chunk_rows]
        if self.writes is not None:  # not tracked slot by slot: every slot counts as written
            self.writes.append(torch.arange(self.positions.shape[1], device=classes.device).expand(classes.shape[0], -1))
        for sequence in range(classes.shape[0]):
            tokens = self.seen[sequence] + torch.arange(classes.shape[1], device=classes.device)  # their positions
            for head in self.layout.stored_heads:
                spec = self.layout.heads[head]
                segment = slice(spec["offset"], spec["offset"] + spec["capacity"])
                scored = slice(spec["score_offset"], spec["score_offset"] + spec["capacity"])
                scores = self.scores[sequence, scored] if spec["frequency"] else None
                own = None if own_scores is None else own_scores[sequence, head]
                writes = chunk_writes(spec, self.counts[sequence, head].tolist(), self.positions[sequence, segment],
                                      scores, classes[sequence], tokens - self.start[sequence], own)
                copied, token, source = writes.source >= 0, writes.token.clamp(min=0), writes.source.clamp(min=0)
                fields = [(buffer[sequence, segment], fresh[sequence, head]) for buffer, fresh in zip(rows, new_rows)]
                fields.append((self.positions[sequence, segment], tokens))
                if scores is not None:
                    fields.append((scores, own))
                for held, fresh in fields:  # each field's copies are read before it is written
                    mask = copied.view(-1, *[1] * (held.dim() - 1))
                    held[writes.target] = torch.where(mask, held[source], fresh[token].to(held.dtype))
                self.counts[sequence, head] = torch.tensor(writes.counts, dtype=self.counts.dtype)

    def take_writes(self) -> torch.Tensor:
        """(batch, n) int64 the slots written since `writes` was set to a list (repeats possible; none
        on a layer without slots), and stop recording."""
        writes, self.writes = self.writes, None
        assert writes is not None, "set store.writes = [] before the steps whose writes you want"
        return torch.cat(writes, 1) if writes else self.positions.new_zeros(self.positions.shape[0], 0, dtype=torch.long)

    # ------------------------------------------------------------ bookkeeping
    def reorder(self, sequences: torch.Tensor) -> None:
        """Keep the given sequences in the given order (beam search)."""
        rows = list(self.rows) if self.bits else [self.rows]
        for buffer in (*rows, self.positions, self.scores, self.counts, self.seen, self.start):
            buffer.copy_(buffer.index_select(0, sequences.to(buffer.device)))

    def reset(self) -> None:
        """Forget the sequences, keep the buffers."""
        if self.allocated:
            self.counts.zero_()
            self.positions.fill_(-1)
            self.scores.zero_()
            self.seen.zero_()
        self.prefilled = False

    def kept_positions(self, sequence: int = 0) -> list[torch.Tensor]:
        """Per KV head, the sorted positions (after the sequence's padding) of the tokens it holds."""
        start, kept = int(self.start[sequence]), []
        for offset, capacity in self.layout.segments:
            positions = self.positions[sequence, offset:offset + capacity].long()
            kept.append(torch.sort(positions[positions >= 0] - start).values)
        return kept


def _score_index(layout, slot):
    """(batch, heads) index into the scores of the slots `slot` (0 on heads without scores; their
    writes repeat a scored head's)."""
    shift = layout.column("score_offset") - layout.column("offset")
    return torch.where(layout.column("frequency") > 0, slot + shift, 0)


def _write(buffer, sequences, slot, mask, value, owners=None):
    """buffer[b, slot[b, h]] = value[b, h] where mask[b, h], in fixed shapes: unmasked entries write
    their slot's own row back. With owners = (heads (heads,) bool, first): only those heads own an
    index; the others repeat the first owner's write, so no index is written twice with two rows."""
    slot = _owned(slot, owners)
    current = buffer[sequences, slot]
    shape = (*mask.shape, *([1] * (current.dim() - mask.dim())))
    written = torch.where(mask.view(shape), value.to(buffer.dtype), current)
    if owners is not None:
        heads, first = owners
        written = torch.where(heads.view(1, -1, *shape[2:]), written, written[:, first:first + 1])
    buffer[sequences, slot] = written


def _owned(slot, owners):
    """The slots `_write` writes: with owners = (heads, first), the heads that own none repeat the first owner's."""
    if owners is None:
        return slot
    heads, first = owners
    return torch.where(heads, slot, slot[:, first:first + 1])
