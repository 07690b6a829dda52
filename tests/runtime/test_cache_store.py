"""The layer store on synthetic K/V: prefill keep-sets follow `keep.keep_set`; new tokens follow
each kind's rule (ring, append-if-member, evict-the-lowest) one at a time or in chunks; a chunk
attends to exactly the kept slots and causally to itself (floats and low-bit rows); memory is every
tensor the cache holds and exactly the plan's; no step decodes a layer into floats; and the Triton
kernels (interpreted) drive the store to the same state as the references."""

import importlib

import pytest
import torch

from kvc.plan import Plan, Target
from kvc.plan import class_members as plan_class_ids
from kvc.policies.errors import KvcError
from kvc.policies.keep import frequency_keep, keep_set
from kvc.policies.kinds import Budget, kind_components
from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT
from kvc.runtime.handmade import head_tables
from kvc.runtime.kernels import observation_scores_reference
from kvc.runtime.quantize import decode, encode
from kvc.runtime.standalone import CompressedKV
from kvc.runtime.store import LayerStore, storage_bytes

HEAD_DIM, GROUP = 16, 2
BUDGET = Budget(sinks=2, window=4, heavy=5)


def tiny_plan(kinds, max_len=64, batch=2, class_slots=32, budget=BUDGET, dtype="float32", kv_bits=0,
              token_classes=None) -> Plan:
    layers, heads = len(kinds), len(kinds[0])
    return Plan(
        model_name="tiny", fingerprint="sha256:tiny", num_layers=layers, num_attention_heads=heads * GROUP,
        num_kv_heads=heads, head_dim=HEAD_DIM, target=Target(max_len=max_len, batch=batch, dtype=dtype),
        token_classes=torch.zeros(8, dtype=torch.uint8) if token_classes is None else token_classes,
        expected_recovery=torch.ones(layers, heads), kv_bits=kv_bits,
        **head_tables(kinds, max_len, budget.sinks, class_slots, budget.heavy, budget.window),
    )


def prompt(generator, batch, heads, length):
    keys = torch.randn(batch, heads, length, HEAD_DIM, generator=generator)
    values = torch.randn(batch, heads, length, HEAD_DIM, generator=generator)
    queries = torch.randn(batch, heads * GROUP, length, HEAD_DIM, generator=generator)
    draw = torch.rand(batch, length, generator=generator)
    classes = torch.where(draw < 0.15, SPECIAL_BIT, torch.where(draw < 0.4, PUNCT_BIT, 0)).to(torch.uint8)
    return keys, values, queries, classes


def kept(store, sequence, head):
    return set(store.kept_positions(sequence)[head].tolist())


def positions(mask):
    return set(torch.nonzero(mask)[:, 0].tolist())


PREFILL_KINDS = ["special", "special+punct", "local", "frequency", "punct+frequency",
                 "special+punct+frequency+local", "full"]


def test_prefill_keep_sets_follow_kinds(generator):
    plan = tiny_plan([PREFILL_KINDS])
    store = LayerStore(plan, 0)
    length, start = 24, torch.tensor([0, 5])
    keys, values, queries, classes = prompt(generator, 2, len(PREFILL_KINDS), length)
    window = queries[:, :, -8:]
    store.prefill(keys, values, classes, start, window)
    scores = observation_scores_reference(window, keys, start, None, plan.pool_kernel)
    assert store.nbytes() + 4 * plan_class_ids(plan.token_classes) == plan.cache_bytes  # the cache holds the class tokens' ids
    for b in range(2):
        s = int(start[b])
        is_special, is_punct = (classes[b, s:] & SPECIAL_BIT) != 0, (classes[b, s:] & PUNCT_BIT) != 0
        for h, kind in enumerate(PREFILL_KINDS):
            reference = keep_set(kind, is_special, is_punct, scores[b, h, s:], BUDGET)
            parts = kind_components(kind)
            if "frequency" not in parts:
                assert kept(store, b, h) == positions(reference), (b, kind)
                continue
            others = [p for p in parts if p != "frequency"]
            base = (keep_set("+".join(others), is_special, is_punct, None, BUDGET) if others
                    else torch.zeros_like(reference))
            rest = ~base
            heavy = frequency_keep(scores[b, h, s:].masked_fill(~rest, float("-inf")), BUDGET.heavy) & rest
            assert kept(store, b, h) == positions(base | heavy), (b, kind)  # SnapKV: top heavy among the rest
            assert kept(store, b, h) >= positions(reference)
            assert len(kept(store, b, h)) <= int(plan.capacity[0, h])


def test_class_slots_keep_the_most_recent_class_tokens(generator):
    plan = tiny_plan([["special+punct"]], class_slots=3)
    store = LayerStore(plan, 0)
    keys, values, _, _ = prompt(generator, 1, 1, 20)
    classes = torch.zeros(1, 20, dtype=torch.uint8)
    classes[0, [3, 6, 9, 12, 15]] = PUNCT_BIT
    store.prefill(keys, values, classes, torch.tensor([0]))
    assert kept(store, 0, 0) == {0, 1, 9, 12, 15}


DECODE_KINDS = ["local", "special+punct", "frequency", "special+punct+frequency+local", "full"]


def step(store, query, key, value, classes):
    """One new token per sequence: (batch, q_heads, head_dim) out."""
    return store.extend(query[:, :, None], key[:, :, None], value[:, :, None], classes[:, None])[:, :, 0]


def head_scores(store, sequence, head):
    """{position after the padding: accumulated score} of a frequency head's filled slots."""
    layout = store.layout.heads[head]
    offset, capacity, first = layout["offset"], layout["capacity"], layout["score_offset"]
    positions = store.positions[sequence, offset:offset + capacity]
    scores = store.scores[sequence, first:first + capacity]
    start = int(store.start[sequence])
    return {int(p) - start: float(v) for p, v in zip(positions, scores) if p >= 0}


def test_new_tokens_follow_each_kind_by_its_rule(generator):
    plan = tiny_plan([DECODE_KINDS], class_slots=3)
    store = LayerStore(plan, 0)
    heads, length, start = len(DECODE_KINDS), 10, torch.tensor([0, 3])
    keys, values, queries, classes = prompt(generator, 2, heads, length)
    store.prefill(keys, values, classes, start, queries[:, :, -4:])
    history = [list(classes[b, int(start[b]):].tolist()) for b in range(2)]
    for index in range(30):
        position = length + index
        before = [head_scores(store, b, 2) for b in range(2)]
        new_classes = torch.tensor([PUNCT_BIT if index % 4 == 0 else 0, SPECIAL_BIT if index % 7 == 3 else 0],
                                   dtype=torch.uint8)
        query = torch.randn(2, heads * GROUP, HEAD_DIM, generator=generator)
        key, value = (torch.randn(2, heads, HEAD_DIM, generator=generator) for _ in range(2))
        output = step(store, query, key, value, new_classes)
        assert output.shape == (2, heads * GROUP, HEAD_DIM) and torch.isfinite(output).all()
        for b in range(2):
            history[b].append(int(new_classes[b]))
            now = position - int(start[b])  # the new token, counted after the padding
            members = [t for t, c in enumerate(history[b]) if c and t >= BUDGET.sinks]
            assert kept(store, b, 0) == set(range(now - BUDGET.window + 1, now + 1))  # ring
            assert kept(store, b, 1) == set(range(BUDGET.sinks)) | set(members[-3:])  # sinks + last class tokens
            assert kept(store, b, 4) == set(range(now + 1))  # full
            frequency = kept(store, b, 2)
            assert now in frequency and len(frequency) == BUDGET.heavy  # the new token enters, the lowest leaves
            evicted = set(before[b]) - frequency
            if evicted:
                assert before[b][evicted.pop()] == min(before[b].values())
            hybrid = kept(store, b, 3)
            window_tokens = [t for t, c in enumerate(history[b]) if not c and t >= BUDGET.sinks]
            assert set(window_tokens[-BUDGET.window:]) | set(range(BUDGET.sinks)) <= hybrid
            assert set(members[-3:]) <= hybrid and len(hybrid) <= int(plan.capacity[0, 3])
    assert bool((store.seen == length + 30).all())
    heavy = store.layout.heads[3]
    assert (store.positions[:, heavy["heavy_base"]:heavy["heavy_base"] + heavy["heavy_quota"]] >= 0).all()


@pytest.mark.parametrize("kv_bits", [8, 4, 2])
def test_prefill_stores_each_kept_row_as_encoding_it_alone_would_and_zeros_in_empty_slots(generator, kv_bits):
    """Low-bit rows are encoded after the kept tokens are gathered (only those are quantised): each
    slot holds exactly the codes and parameters of its own prompt row, an empty slot zeros."""
    plan = tiny_plan([PREFILL_KINDS], kv_bits=kv_bits, max_len=64)
    store = LayerStore(plan, 0)
    length, start = 40, torch.tensor([0, 9])
    keys, values, queries, classes = prompt(generator, 2, len(PREFILL_KINDS), length)
    store.prefill(keys, values, classes, start, queries[:, :, -8:])
    kinds_of_slot = set()
    for side, vectors in enumerate((keys, values)):
        codes, params = store._side(side)
        for b in range(2):
            for head, (offset, capacity) in enumerate(store.layout.segments):
                slots = slice(offset, offset + capacity)
                filled = store.positions[b, slots] >= 0
                kinds_of_slot.update(filled.tolist())
                rows = encode(vectors[b, head, store.positions[b, slots][filled].long()], kv_bits, store.rotation)
                assert torch.equal(codes[b, slots][filled], rows.codes)
                assert torch.equal(params[b, slots][filled], rows.params)
                assert not codes[b, slots][~filled].any() and not params[b, slots][~filled].any()
    assert kinds_of_slot == {True, False}  # filled and empty slots were both checked


EXTEND_KINDS = [["special+punct+frequency+local", "local", "punct+frequency", "full", "frequency"]]


@pytest.mark.parametrize("kv_bits", [0, 8, 4])
@pytest.mark.parametrize("chunk", [1, 2, 7, 64])
def test_a_chunk_attends_to_the_kept_slots_and_to_itself(generator, kv_bits, chunk):
    """Standalone API: each chunk query's output is softmax attention over the tokens the positions
    table names before the chunk plus the chunk up to itself (as the rows store them); the window
    (4) is shorter than most chunks, and the frequency heads must evict inside them."""
    plan = tiny_plan(EXTEND_KINDS, batch=1, class_slots=3, kv_bits=kv_bits, max_len=256,
                     token_classes=torch.tensor([0, 0, 0, 0, 0, PUNCT_BIT, SPECIAL_BIT, 0], dtype=torch.uint8))
    stored = (lambda x: decode(encode(x, kv_bits), kv_bits)) if kv_bits else (lambda x: x)
    cache = CompressedKV(plan, batch=1)
    heads, length = len(EXTEND_KINDS[0]), 9
    keys, values, queries, _ = prompt(generator, 1, heads, length)
    cache.prefill(0, keys, values, torch.randint(0, 8, (1, length), generator=generator),
                  query_window=queries[:, :, -4:])
    for _ in range(2):
        before = cache.layers[0].kept_positions(0)
        query = torch.randn(1, heads * GROUP, chunk, HEAD_DIM, generator=generator)
        new_keys, new_values = (torch.randn(1, heads, chunk, HEAD_DIM, generator=generator) for _ in range(2))
        output = cache.extend(0, query, new_keys, new_values, torch.randint(0, 8, (1, chunk), generator=generator))
        seen = keys.shape[2]
        keys, values = torch.cat([keys, new_keys], 2), torch.cat([values, new_values], 2)
        for head, kept_positions in enumerate(before):
            group = slice(head * GROUP, (head + 1) * GROUP)
            for index in range(chunk):
                visible = torch.cat([kept_positions, torch.arange(seen, seen + index + 1)])
                scores = query[0, group, index] @ stored(keys[0, head, visible]).T * HEAD_DIM ** -0.5
                expected = torch.softmax(scores, -1) @ stored(values[0, head, visible])
                torch.testing.assert_close(output[0, group, index], expected, atol=1e-5, rtol=1e-4)
        capacity = plan.capacity[0].tolist()
        assert all(len(kept) == min(capacity[h], seen + chunk) or EXTEND_KINDS[0][h] != "full"
                   for h, kept in enumerate(cache.layers[0].kept_positions(0)))
    assert cache.nbytes() == plan.cache_bytes


def test_a_chunk_equals_single_steps_where_admission_does_not_depend_on_chunking(generator):
    """A keep-everything plan gives the same outputs chunked or token by token; ring kinds keep the
    same tokens either way (their outputs differ: a chunk's queries still see what the ring evicts
    inside the chunk)."""
    plan = tiny_plan([["full", "full"], ["local", "special+punct"]], batch=1, class_slots=3, max_len=64,
                     token_classes=torch.tensor([0, 0, PUNCT_BIT, 0, SPECIAL_BIT, 0, 0, 0], dtype=torch.uint8))
    chunked, single = CompressedKV(plan), CompressedKV(plan)
    keys, values, queries, _ = prompt(generator, 1, 2, 6)
    token_ids = torch.randint(0, 8, (1, 6), generator=generator)
    for cache in (chunked, single):
        for layer in range(2):
            cache.prefill(layer, keys, values, token_ids)
    query = torch.randn(1, 4, 11, HEAD_DIM, generator=generator)
    new_keys, new_values = (torch.randn(1, 2, 11, HEAD_DIM, generator=generator) for _ in range(2))
    new_ids = torch.randint(0, 8, (1, 11), generator=generator)
    for layer in range(2):
        together = chunked.extend(layer, query, new_keys, new_values, new_ids)
        apart = torch.stack([single.decode(layer, query[:, :, i], new_keys[:, :, i], new_values[:, :, i],
                                           new_ids[:, i]) for i in range(11)], 2)
        if layer == 0:
            torch.testing.assert_close(together, apart, atol=1e-6, rtol=1e-5)
        else:
            assert not torch.allclose(together, apart)  # the window's evictions show token by token
        for a, b in zip(chunked.layers[layer].kept_positions(0), single.layers[layer].kept_positions(0)):
            assert torch.equal(a, b)


def held_tokens(store, sequence, head):
    """position -> (score, stored row) of every token a head holds: its state whatever the slot order."""
    offset, capacity = store.layout.segments[head]
    layout = store.layout.heads[head]
    rows = [part[sequence, offset:offset + capacity] for part in (store.rows if store.bits else [store.rows])]
    held = {}
    for slot in range(capacity):
        position = int(store.positions[sequence, offset + slot])
        if position >= 0:
            score = float(store.scores[sequence, layout["score_offset"] + slot]) if layout["frequency"] else 0.0
            held[position] = (score, [row[slot].tolist() for row in rows])
    return held


@pytest.mark.parametrize("kv_bits", [0, 8])
@pytest.mark.parametrize("chunk", [2, 5, 13, 40])
def test_a_chunk_admitted_at_once_keeps_what_one_by_one_admission_keeps(generator, kv_bits, chunk):
    """Eagerly a chunk's tokens are admitted all at once (`admission.chunk_writes`); traced steps admit
    them one by one. Both must leave every head the same tokens with the same scores and rows, and
    the same ring counters: sinks, class rings, windows, window tokens joining the heavy hitters and
    heavy-only heads replacing their weakest, over a padded batch and three chunks in a row."""
    kinds = [["special+punct+frequency+local", "local", "punct+frequency", "full", "frequency", "special+punct"]]
    plan = tiny_plan(kinds, batch=2, class_slots=3, kv_bits=kv_bits, max_len=256,
                     token_classes=torch.tensor([0, 0, 0, 0, 0, PUNCT_BIT, SPECIAL_BIT, 0], dtype=torch.uint8))
    at_once, one_by_one = CompressedKV(plan, batch=2), CompressedKV(plan, batch=2)
    one_by_one.layers[0].admit_chunks = False
    heads, length = len(kinds[0]), 7
    keys, values, queries, _ = prompt(generator, 2, heads, length)
    ids = torch.randint(0, 8, (2, length), generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :2] = 0  # the second sequence is left-padded: its sinks count from its first real token
    for cache in (at_once, one_by_one):
        cache.prefill(0, keys, values, ids, query_window=queries[:, :, -4:], attention_mask=mask)
    for _ in range(3):
        query = torch.randn(2, heads * GROUP, chunk, HEAD_DIM, generator=generator)
        new_keys, new_values = (torch.randn(2, heads, chunk, HEAD_DIM, generator=generator) for _ in range(2))
        new_ids = torch.randint(0, 8, (2, chunk), generator=generator)
        outputs = [cache.extend(0, query, new_keys, new_values, new_ids) for cache in (at_once, one_by_one)]
        torch.testing.assert_close(*outputs, atol=1e-5, rtol=1e-5)  # the same slots, perhaps in another order
        first, second = at_once.layers[0], one_by_one.layers[0]
        assert torch.equal(first.counts, second.counts) and torch.equal(first.seen, second.seen)
        for sequence in range(2):
            for head in range(heads):
                held, expected = held_tokens(first, sequence, head), held_tokens(second, sequence, head)
                assert held.keys() == expected.keys(), (sequence, head)
                for position, (score, row) in held.items():  # scores summed over slots in another order
                    assert row == expected[position][1] and score == pytest.approx(expected[position][0], rel=1e-5), \
                        (sequence, head, position)


def test_nbytes_is_every_tensor_the_cache_holds(generator):
    """Walk the cache object: the storages of all its tensors (the plan it was given aside) add up to
    nbytes() and to the plan's cache_bytes; low-bit rows, zero-capacity heads and frequency heads included."""
    plan = tiny_plan([["special+punct+frequency+local", "punct", "full"], ["local", "frequency", "full"]],
                     batch=2, class_slots=0, kv_bits=8, budget=Budget(sinks=0, window=3, heavy=2))
    assert int(plan.capacity[0, 1]) == 0
    cache = CompressedKV(plan, batch=2)
    found = []

    def walk(value, seen):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif id(value) in seen or value is plan or isinstance(value, (str, bytes, int, float, type(None))):
            return
        elif isinstance(value, dict):
            seen.add(id(value))
            for item in value.values():
                walk(item, seen)
        elif isinstance(value, (list, tuple, set)):
            seen.add(id(value))
            for item in value:
                walk(item, seen)
        elif hasattr(value, "__dict__"):
            seen.add(id(value))
            walk(vars(value), seen)

    walk(cache, set())
    assert storage_bytes(found) == cache.nbytes() == plan.cache_bytes


def test_no_step_decodes_a_layer_into_floats(generator, monkeypatch):
    """The largest allocation of a step stays below one float copy of a head's keys."""
    monkeypatch.setattr(importlib.import_module("kvc.runtime.kernels.slot_attention"), "REFERENCE_BLOCK", 256)
    plan = tiny_plan([["full", "local"]], batch=1, kv_bits=8, max_len=2048)
    cache = CompressedKV(plan, batch=1)
    keys, values, queries, _ = prompt(generator, 1, 2, 2000)
    cache.prefill(0, keys, values, torch.zeros(1, 2000, dtype=torch.long))
    float_keys = 2048 * HEAD_DIM * 4  # the full head's keys as float32
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        cache.extend(0, torch.randn(1, 4, 1, HEAD_DIM), torch.randn(1, 2, 1, HEAD_DIM), torch.randn(1, 2, 1, HEAD_DIM),
                     torch.zeros(1, 1, dtype=torch.long))
    largest = max(event.cpu_memory_usage for event in profile.events())
    assert 0 < largest < float_keys / 2, largest


def test_zero_capacity_heads_and_a_smaller_batch(generator):
    plan = tiny_plan([["local", "punct", "frequency"]], budget=Budget(sinks=0, window=3, heavy=2), class_slots=0)
    assert int(plan.capacity[0, 1]) == 0
    cache = CompressedKV(plan, batch=1)
    assert cache.nbytes() == plan.cache_bytes_at(1)  # half the plan's batch: half its per-sequence bytes
    keys, values, queries, _ = prompt(generator, 1, 3, 6)
    cache.prefill(0, keys, values, torch.zeros(1, 6, dtype=torch.long), queries[:, :, -2:])
    for _ in range(4):
        cache.decode(0, torch.randn(1, 6, HEAD_DIM, generator=generator), torch.randn(1, 3, HEAD_DIM,
                     generator=generator), torch.randn(1, 3, HEAD_DIM, generator=generator), torch.zeros(1, dtype=torch.long))
    assert cache.layers[0].filled_slots().tolist() == [[3, 0, 2]]


def test_store_refusals(generator):
    plan = tiny_plan([["local"]], max_len=16, batch=1)
    with pytest.raises(KvcError, match="--batch 2`"):
        LayerStore(plan, 0).allocate(2, "cpu")
    keys, values, _, classes = prompt(generator, 1, 1, 20)
    with pytest.raises(KvcError, match="max-len 16"):
        LayerStore(plan, 0).prefill(keys, values, classes, torch.tensor([0]))


@pytest.mark.parametrize("kv_bits", [0, 8])
def test_triton_kernels_drive_the_store_like_the_references(generator, kv_bits):
    kinds = [["special+punct+frequency+local", "local", "full"]]
    stores = {name: LayerStore(tiny_plan(kinds, batch=1, kv_bits=kv_bits), 0, kernels=name)
              for name in ("reference", "triton")}
    keys, values, queries, classes = prompt(generator, 1, 3, 12)
    chunks = [(torch.randn(1, 6, size, HEAD_DIM, generator=generator),
               torch.randn(1, 3, size, HEAD_DIM, generator=generator),
               torch.randn(1, 3, size, HEAD_DIM, generator=generator)) for size in (1, 3, 1)]
    outputs = {}
    for name, store in stores.items():
        store.prefill(keys, values, classes, torch.tensor([0]), queries[:, :, -4:])
        outputs[name] = [store.extend(q, k, v, torch.zeros(1, q.shape[2], dtype=torch.uint8)) for q, k, v in chunks]
    reference, triton = stores["reference"], stores["triton"]
    assert torch.equal(reference.positions, triton.positions)
    for a, b in zip(reference.held_tensors(), triton.held_tensors()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    for a, b in zip(outputs["reference"], outputs["triton"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_layer_without_slots(generator):
    plan = tiny_plan([["punct", "punct"]], batch=1, class_slots=0, budget=Budget(sinks=0))
    cache = CompressedKV(plan)
    keys, values, _, _ = prompt(generator, 1, 2, 5)
    cache.prefill(0, keys, values, torch.zeros(1, 5, dtype=torch.long))
    output = cache.decode(0, torch.randn(1, 4, HEAD_DIM, generator=generator), keys[:, :, 0], values[:, :, 0],
                          torch.zeros(1, dtype=torch.long))
    assert cache.nbytes() == plan.cache_bytes and plan.cache_bytes == plan.overhead_bytes
    # Nothing cached: each query sees only its own token.
    torch.testing.assert_close(output, values[:, :, 0].repeat_interleave(GROUP, 1), atol=1e-6, rtol=0)
