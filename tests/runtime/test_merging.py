"""Evicted prompt tokens merged into the nearest heavy hitter's value (in a context compressed before
its questions, any kept token's but a sink's): a hand-made case, a per-token loop on random ragged
prompts (eager blocks and one product alike), the store merging only when its plan says, and the
plan file carrying the setting (the compiler's and CLI's side: tests/compiler; a probed context:
tests/runtime/test_probe.py)."""

import pytest
import torch

import kvc.runtime.merging as merging
from kvc.plan import Plan
from kvc.policies.errors import KvcError
from kvc.policies.kinds import Budget
from kvc.runtime.kernels import observation_scores_reference
from kvc.runtime.layout import HEAVY, NO_GROUP, SINK
from kvc.runtime.merging import merge_evicted
from kvc.runtime.selection import keep_groups, slot_sources
from kvc.runtime.store import LayerStore
from tests.runtime.test_cache_store import HEAD_DIM, prompt, tiny_plan


def merged_by_loop(keys, values, groups, index, frequency, start, similarity, questions_later=False):
    """The rule token by token: each evicted token of a frequency head joins its nearest heavy hitter
    (with questions_later, its nearest kept token but a sink)."""
    takes = (lambda group: group != SINK) if questions_later else (lambda group: group == HEAVY)
    out = values.clone()
    batch, heads, length, _ = keys.shape
    for b in range(batch):
        for h in range(heads):
            if not frequency[h]:
                continue
            slots = [int(p) for p in index[b, h] if p >= 0 and takes(groups[b, h, p])]
            joined = {p: [values[b, h, p]] for p in slots}
            for t in range(int(start[b]), length):
                if groups[b, h, t] != NO_GROUP or not slots:
                    continue
                sims = [float(torch.cosine_similarity(keys[b, h, t], keys[b, h, p], 0)) for p in slots]
                best = max(range(len(slots)), key=lambda i: (sims[i], -i))
                if sims[best] >= similarity:
                    joined[slots[best]].append(values[b, h, t])
            for p, members in joined.items():
                out[b, h, p] = torch.stack(members).mean(0)
    return out


def groups_and_index(plan, keys, queries, classes, start):
    """A store's layout, the prompt's keep groups by its last 4 queries' scores, and the slots' positions."""
    layout = LayerStore(plan, 0).layout
    scores = observation_scores_reference(queries[:, :, -4:], keys, start, None, plan.pool_kernel)
    groups = keep_groups(layout, classes, start, scores)
    return layout, groups, slot_sources(layout, groups)[0]


KINDS = ["frequency", "special+punct+frequency+local", "local", "full"]


@pytest.mark.parametrize("questions_later", [False, True])
@pytest.mark.parametrize("block", [merging.KEY_BLOCK, 5])
@pytest.mark.parametrize("similarity", [-1.0, 0.0, 0.3])
def test_merging_matches_the_rule_token_by_token(generator, monkeypatch, block, similarity, questions_later):
    monkeypatch.setattr(merging, "KEY_BLOCK", block)  # 5: the eager path in several blocks
    plan = tiny_plan([KINDS])
    length, start = 23, torch.tensor([0, 6])  # ragged: the second prompt left-padded
    keys, values, queries, classes = prompt(generator, 2, len(KINDS), length)
    layout, groups, index = groups_and_index(plan, keys, queries, classes, start)
    got = merge_evicted(layout, keys, values, groups, index, start, similarity, questions_later)
    frequency = [bool(head["frequency"]) for head in layout.heads]
    expected = merged_by_loop(keys, values, groups, index, frequency, start, similarity, questions_later)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, values)  # something merged in every setting drawn here
    untouched = [h for h, f in enumerate(frequency) if not f]
    assert torch.equal(got[:, untouched], values[:, untouched])  # heads without heavy hitters never merge


def test_hand_made_merge():
    """One head: sinks 0-1, heavy hitters 2 and 3, window 8-9; tokens 4-7 evicted. Token 4's key is
    token 2's (joins it), token 5's nearly token 3's (joins it); token 6's is sink 0's and token 7's
    the window's token 9: neither takes merged values, and no heavy hitter is like them."""
    plan = tiny_plan([["special+frequency+local"]], batch=1, class_slots=0, budget=Budget(sinks=2, window=2, heavy=2))
    basis = torch.eye(HEAD_DIM)
    near_3 = torch.nn.functional.normalize(basis[3] + 0.1 * basis[4], dim=0)
    rows = [basis[0], basis[1], basis[2], basis[3], basis[2], near_3, basis[0], basis[9], basis[8], basis[9]]
    keys = torch.stack(rows)[None, None]
    values = torch.arange(10.0)[:, None].expand(10, HEAD_DIM)[None, None].clone()
    scores = torch.zeros(1, 1, 10)
    scores[0, 0, [2, 3]] = 1.0
    start = torch.tensor([0])
    store = LayerStore(plan, 0)
    groups = keep_groups(store.layout, torch.zeros(1, 10, dtype=torch.uint8), start, scores)
    index = slot_sources(store.layout, groups)[0]
    assert sorted(index[0, 0].tolist()) == [0, 1, 2, 3, 8, 9]
    got = merge_evicted(store.layout, keys, values, groups, index, start, 0.5)[0, 0, :, 0]
    assert got.tolist() == [0, 1, (2 + 4) / 2, (3 + 5) / 2, 4, 5, 6, 7, 8, 9]
    stricter = merge_evicted(store.layout, keys, values, groups, index, start, 0.999)[0, 0, :, 0]  # token 5: 0.995
    assert stricter.tolist() == [0, 1, (2 + 4) / 2, 3, 4, 5, 6, 7, 8, 9]
    # Before its questions the window is context too: token 7 joins token 9; token 6 still joins no sink.
    context = merge_evicted(store.layout, keys, values, groups, index, start, 0.5, questions_later=True)[0, 0, :, 0]
    assert context.tolist() == [0, 1, (2 + 4) / 2, (3 + 5) / 2, 4, 5, 6, 7, 8, (9 + 7) / 2]


def test_store_merges_only_when_the_plan_says(generator):
    base = tiny_plan([KINDS], batch=2)
    merged = tiny_plan([KINDS], batch=2)
    merged.merge_similarity = 0.0
    keys, values, queries, classes = prompt(generator, 2, len(KINDS), 30)
    start = torch.tensor([0, 4])
    stores = [LayerStore(plan, 0) for plan in (base, merged)]
    for store in stores:
        store.prefill(keys, values, classes, start, queries[:, :, -4:])
    assert torch.equal(stores[0].positions, stores[1].positions)  # the same tokens kept
    assert torch.equal(stores[0].keys, stores[1].keys)
    differs = (stores[0].values != stores[1].values).any(-1)  # (batch, slots)
    assert differs.any()
    frequency_slots = torch.zeros(stores[0].layout.total_slots, dtype=torch.bool)
    for head in stores[0].layout.frequency_heads:
        offset, capacity = stores[0].layout.segments[head]
        frequency_slots[offset:offset + capacity] = True
    assert not differs[:, ~frequency_slots].any()
    layout, groups, index = groups_and_index(merged, keys, queries, classes, start)
    expected = merge_evicted(layout, keys, values, groups, index, start, 0.0)
    kept = stores[1].positions >= 0
    for b in range(2):
        slots = kept[b].nonzero()[:, 0]
        heads = [next(h for h, (o, c) in enumerate(layout.segments) if o <= s < o + c) for s in slots.tolist()]
        want = torch.stack([expected[b, h, stores[1].positions[b, s]] for h, s in zip(heads, slots.tolist())])
        torch.testing.assert_close(stores[1].values[b, slots], want)


def test_plan_file_carries_the_merge_similarity(tmp_path):
    plan = tiny_plan([["frequency"]])
    assert Plan.load(plan.save(tmp_path / "none.plan")).merge_similarity is None
    plan.merge_similarity = 0.25
    assert Plan.load(plan.save(tmp_path / "a.plan")).merge_similarity == 0.25
    plan.merge_similarity = 1.5
    with pytest.raises(KvcError, match=r"merge_similarity: 1.5 is outside \[-1.0, 1.0\]"):
        plan.save(tmp_path / "b.plan")
    assert not (tmp_path / "b.plan").exists()
