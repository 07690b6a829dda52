"""One sequence's compressed cache of one layer as a byte page: the unit a serving engine allocates.

A page packs the layer's `sequence_fields` (slot positions, frequency scores, ring counters, tokens
seen, padding start, then the key/value rows) back to back, padded to PAGE_ALIGNMENT bytes. A block
of the engine's cache is one page per layer, so each request holds exactly its plan's bytes.
`PageViews` turns an engine's raw pages of a layer, (blocks, page bytes) however strided, into the
typed tensors a `LayerStore` runs on, for any set of blocks. Under tensor parallelism every rank
holds its own heads' share of each layer, and lays its layers out across the block itself
(`block_pages`, `layer_offsets`). No vLLM here.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from kvc.plan import Plan
from kvc.runtime.store import sequence_fields

PAGE_ALIGNMENT = 16  # bytes: pages (and so the blocks made of them) keep every field aligned
SLOT_FIELDS = ("positions", "rows", "params", "codes")  # the fields with a row per slot (`sequence_fields`)


@dataclass(frozen=True)
class Field:
    name: str
    dtype: torch.dtype
    shape: tuple
    offset: int  # bytes from the start of the page
    nbytes: int


def page_fields(plan: Plan, layer: int) -> list[Field]:
    """The fields of a layer's page in order, with their byte offsets."""
    fields, offset = [], 0
    for name, dtype, shape in sequence_fields(plan, layer):
        count = 1
        for size in shape:
            count *= size
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        fields.append(Field(name, dtype, shape, offset, nbytes))
        offset += nbytes
    return fields


def used_bytes(plan: Plan, layer: int) -> int:
    """Bytes of one sequence's state of a layer (the plan's accounting, without the shared tables)."""
    last = page_fields(plan, layer)[-1]
    return last.offset + last.nbytes


def page_bytes(plan: Plan, layer: int) -> int:
    """`used_bytes` rounded up to PAGE_ALIGNMENT."""
    return -(-used_bytes(plan, layer) // PAGE_ALIGNMENT) * PAGE_ALIGNMENT


def layer_offsets(plan: Plan) -> list[int]:
    """Where each layer's page begins in a request's block on a rank holding `plan` (its share of the
    heads): the layers' pages back to back, in layer order."""
    return list(accumulate((page_bytes(plan, layer) for layer in range(plan.num_layers)), initial=0))[:-1]


def block_pages(rank_plans: list[Plan]) -> list[int]:
    """Each layer's page in the engine's KV-cache spec, the same on every tensor-parallel rank (as an
    engine needs): the pages of the rank whose layers take the most bytes. rank_plans: every rank's
    slice of the plan (`Plan.rank_slice`), the whole plan alone without parallelism. The ranks' heads
    keep different numbers of slots, layer by layer, so another rank's layer may need more than its
    spec's page: each rank lays its layers out across the whole block (`layer_offsets`), which holds
    the largest rank's bytes, not a page per layer sized for the largest rank of that layer."""
    totals = [sum(page_bytes(plan, layer) for layer in range(plan.num_layers)) for plan in rank_plans]
    largest = rank_plans[totals.index(max(totals))]
    return [page_bytes(largest, layer) for layer in range(largest.num_layers)]


def rank_imbalance(plan: Plan, ranks: int) -> float:
    """A request's bytes per rank when `plan` is served over `ranks` (the largest rank's, `block_pages`)
    over the mean rank's own: 1.0 for a plan compiled for those ranks."""
    slices = [plan.rank_slice(rank, ranks) for rank in range(ranks)]
    own = [sum(page_bytes(part, layer) for layer in range(part.num_layers)) for part in slices]
    return sum(block_pages(slices)) * ranks / sum(own)


class PageViews:
    """Typed views of one layer's pages. raw: (blocks, page bytes) int8/uint8, each row one page (rows
    may be strided: other layers' pages lie between them)."""

    def __init__(self, plan: Plan, layer: int, raw: torch.Tensor):
        assert raw.dim() == 2 and raw.shape[1] >= used_bytes(plan, layer) and raw.stride(1) == 1, tuple(raw.shape)
        assert raw.stride(0) % PAGE_ALIGNMENT == 0 and raw.storage_offset() % PAGE_ALIGNMENT == 0
        raw = raw.view(torch.uint8)
        self.fields = {field.name: raw[:, field.offset:field.offset + field.nbytes].view(field.dtype)
                       .view(raw.shape[0], *field.shape) for field in page_fields(plan, layer)}

    def gather(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copies of the given blocks' fields, batched in that order."""
        return {name: view.index_select(0, blocks) for name, view in self.fields.items()}

    def scatter(self, blocks: torch.Tensor, state: dict[str, torch.Tensor], slots: torch.Tensor | None = None) -> None:
        """Write gathered (and since changed) fields back into their blocks. slots (requests, n): the
        only slots written since the gather (`LayerStore.take_writes`): the rows and positions are
        written back there alone (most of a page's bytes), the small fields whole."""
        requests = torch.arange(len(blocks), device=blocks.device)[:, None]
        for name, view in self.fields.items():
            if slots is None or name not in SLOT_FIELDS:
                view.index_copy_(0, blocks, state[name])
            else:
                view[blocks[:, None], slots] = state[name][requests, slots]

    def block(self, block: int) -> dict[str, torch.Tensor]:
        """One block's fields as views (a batch of one): writes land in the page itself."""
        return {name: view[block:block + 1] for name, view in self.fields.items()}
