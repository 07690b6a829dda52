"""The layer store on synthetic K/V: prefill keep-sets follow `kinds.keep_set`, decode writes follow
each kind's rule (ring, append-if-member, evict-the-lowest), memory is exactly the plan's, and the
Triton kernels (interpreted) drive the store to the same state as the references."""

import pytest
import torch

from kvc.plan import Plan, Target
from kvc.policies.errors import KvcError
from kvc.policies.kinds import Budget, frequency_keep, keep_set, kind_components
from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT
from kvc.runtime.handmade import head_tables
from kvc.runtime.kernels import observation_scores_reference
from kvc.runtime.layout import HEAVY, WINDOW
from kvc.runtime.quantize import decode, encode
from kvc.runtime.standalone import CompressedKV
from kvc.runtime.store import LayerStore

HEAD_DIM, GROUP = 16, 2
BUDGET = Budget(sinks=2, window=4, heavy=5)


def tiny_plan(kinds, max_len=64, batch=2, class_slots=32, budget=BUDGET, dtype="float32", kv_bits=0) -> Plan:
    layers, heads = len(kinds), len(kinds[0])
    return Plan(
        model_name="tiny", fingerprint="sha256:tiny", num_layers=layers, num_attention_heads=heads * GROUP,
        num_kv_heads=heads, head_dim=HEAD_DIM, target=Target(max_len=max_len, batch=batch, dtype=dtype),
        token_classes=torch.zeros(8, dtype=torch.uint8), expected_recovery=torch.ones(layers, heads), kv_bits=kv_bits,
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
    assert store.nbytes() == plan.cache_bytes
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


def head_scores(store, sequence, head):
    """{position after the padding: accumulated score} of a frequency head's filled slots."""
    layout = store.layout
    offset, score_offset = int(layout.offsets[head]), int(layout.score_offsets[head])
    length, start = int(store.lengths[sequence, head]), int(store.start[sequence])
    return dict(zip((store.positions[sequence, offset:offset + length] - start).tolist(),
                    store.scores[sequence, score_offset:score_offset + length].tolist()))


def test_decode_writes_each_kind_by_its_rule(generator):
    plan = tiny_plan([DECODE_KINDS], class_slots=3)
    store = LayerStore(plan, 0)
    heads, length, start = len(DECODE_KINDS), 10, torch.tensor([0, 3])
    keys, values, queries, classes = prompt(generator, 2, heads, length)
    store.prefill(keys, values, classes, start, queries[:, :, -4:])
    history = [list(classes[b, int(start[b]):].tolist()) for b in range(2)]
    for step in range(30):
        position = length + step
        before = [head_scores(store, b, 2) for b in range(2)]
        new_classes = torch.tensor([PUNCT_BIT if step % 4 == 0 else 0, SPECIAL_BIT if step % 7 == 3 else 0],
                                   dtype=torch.uint8)
        query = torch.randn(2, heads * GROUP, HEAD_DIM, generator=generator)
        key, value = torch.randn(2, heads, HEAD_DIM, generator=generator), torch.randn(2, heads, HEAD_DIM,
                                                                                          generator=generator)
        output = store.decode(query, key, value, new_classes)
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
            assert set(range(now - BUDGET.window + 1, now + 1)) | set(range(BUDGET.sinks)) <= hybrid
            assert set(members[-3:]) <= hybrid and len(hybrid) <= int(plan.capacity[0, 3])
        assert (store.counts <= store.layout.quotas).all()
    assert (store.counts[:, 3, HEAVY] > 0).all() and (store.counts[:, 3, WINDOW] == BUDGET.window).all()


@pytest.mark.parametrize("kv_bits", [0, 8, 4])
def test_decode_attends_to_exactly_the_kept_tokens(generator, kv_bits):
    """Standalone API: each head's output is softmax attention over the tokens its positions table names
    (as their low-bit rows decode, on a low-bit plan), and the cache takes the plan's bytes."""
    kinds = [["special+punct+frequency+local", "local", "punct+frequency", "full"]]
    plan = tiny_plan(kinds, batch=1, class_slots=3, kv_bits=kv_bits)
    stored = (lambda x: decode(encode(x, kv_bits), kv_bits, HEAD_DIM)) if kv_bits else (lambda x: x)
    cache = CompressedKV(plan, batch=1)
    heads, length = len(kinds[0]), 9
    keys, values, queries, _ = prompt(generator, 1, heads, length)
    token_ids = torch.randint(0, 8, (1, length), generator=generator)
    cache.token_classes = torch.tensor([0, 0, 0, 0, 0, PUNCT_BIT, SPECIAL_BIT, 0], dtype=torch.uint8)
    cache.prefill(0, keys, values, token_ids, query_window=queries[:, :, -4:])
    for _ in range(12):
        query = torch.randn(1, heads * GROUP, HEAD_DIM, generator=generator)
        key, value = torch.randn(1, heads, HEAD_DIM, generator=generator), torch.randn(1, heads, HEAD_DIM,
                                                                                          generator=generator)
        keys, values = torch.cat([keys, key[:, :, None]], 2), torch.cat([values, value[:, :, None]], 2)
        output = cache.decode(0, query, key, value, torch.randint(0, 8, (1,), generator=generator))
        for head, kept_positions in enumerate(cache.layers[0].kept_positions(0)):
            group = slice(head * GROUP, (head + 1) * GROUP)
            scores = query[0, group] @ stored(keys[0, head, kept_positions]).T * HEAD_DIM ** -0.5
            expected = torch.softmax(scores, -1) @ stored(values[0, head, kept_positions])
            torch.testing.assert_close(output[0, group], expected, atol=1e-5, rtol=1e-4)
    assert cache.nbytes() == plan.cache_bytes
    assert (cache.layers[0].keys.dtype == torch.uint8) == bool(kv_bits)


def test_zero_capacity_heads_and_a_smaller_batch(generator):
    plan = tiny_plan([["local", "punct", "frequency"]], budget=Budget(sinks=0, window=3, heavy=2), class_slots=0)
    assert int(plan.capacity[0, 1]) == 0
    cache = CompressedKV(plan, batch=1)
    assert cache.nbytes() * 2 == plan.cache_bytes  # half the plan's batch, half its bytes
    keys, values, queries, _ = prompt(generator, 1, 3, 6)
    cache.prefill(0, keys, values, torch.zeros(1, 6, dtype=torch.long), queries[:, :, -2:])
    for _ in range(4):
        cache.decode(0, torch.randn(1, 6, HEAD_DIM, generator=generator), torch.randn(1, 3, HEAD_DIM,
                     generator=generator), torch.randn(1, 3, HEAD_DIM, generator=generator), torch.zeros(1, dtype=torch.long))
    assert cache.layers[0].lengths.tolist() == [[3, 0, 2]]


def test_store_refusals(generator):
    plan = tiny_plan([["local"]], max_len=16, batch=1)
    with pytest.raises(KvcError, match="--batch 2`"):
        LayerStore(plan, 0).allocate(2, "cpu")
    keys, values, _, classes = prompt(generator, 1, 1, 20)
    with pytest.raises(KvcError, match="max-len 16"):
        LayerStore(plan, 0).prefill(keys, values, classes, torch.tensor([0]))


def test_triton_kernels_drive_the_store_like_the_references(generator):
    kinds = [["special+punct+frequency+local", "local", "full"]]
    stores = {name: LayerStore(tiny_plan(kinds, batch=1), 0, kernels=name) for name in ("reference", "triton")}
    keys, values, queries, classes = prompt(generator, 1, 3, 12)
    steps = [(torch.randn(1, 6, HEAD_DIM, generator=generator), torch.randn(1, 3, HEAD_DIM, generator=generator),
              torch.randn(1, 3, HEAD_DIM, generator=generator)) for _ in range(3)]
    outputs = {}
    for name, store in stores.items():
        store.prefill(keys, values, classes, torch.tensor([0]), queries[:, :, -4:])
        outputs[name] = [store.decode(q, k, v, torch.zeros(1, dtype=torch.uint8)) for q, k, v in steps]
    reference, triton = stores["reference"], stores["triton"]
    assert torch.equal(reference.positions, triton.positions)
    torch.testing.assert_close(triton.keys, reference.keys)
    torch.testing.assert_close(triton.scores, reference.scores, atol=1e-5, rtol=1e-4)
    for a, b in zip(outputs["reference"], outputs["triton"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_layer_without_slots(generator):
    plan = tiny_plan([["punct", "punct"]], batch=1, class_slots=0, budget=Budget(sinks=0))
    cache = CompressedKV(plan)
    keys, values, _, _ = prompt(generator, 1, 2, 5)
    cache.prefill(0, keys, values, torch.zeros(1, 5, dtype=torch.long))
    output = cache.decode(0, torch.randn(1, 4, HEAD_DIM, generator=generator), keys[:, :, 0], values[:, :, 0],
                          torch.zeros(1, dtype=torch.long))
    assert cache.nbytes() == plan.cache_bytes == 0 and torch.equal(output, torch.zeros_like(output))
