"""The plan as vLLM sees it, without starting an engine: pages (and what a batch over copies of them
writes back), the KV-cache spec, the one-block manager, and the plan sliced for tensor-parallel ranks. The tests that import vLLM carry the `vllm`
marker and run in the environment that has it (the Makefile's .venv-vllm); the rest run in both."""

import pytest
import torch

from kvc.runtime.store import LayerStore
from kvc.serving.vllm.pages import PAGE_ALIGNMENT, PageViews, block_pages, page_bytes, page_fields, used_bytes


@pytest.fixture(scope="module", params=[0, 8], ids=["bf16", "8-bit"])
def plan(request, passkey_policy):
    from kvc.compiler import compile_policy

    return compile_policy(passkey_policy, 0.25, max_len=1040, kv_bits=request.param)


def test_pages_hold_exactly_the_plans_bytes_per_sequence(plan):
    per_sequence = sum(used_bytes(plan, layer) for layer in range(plan.num_layers))
    assert per_sequence == plan.cache_bytes_at(1) - plan.table_bytes
    for layer in range(plan.num_layers):
        assert 0 <= page_bytes(plan, layer) - used_bytes(plan, layer) < PAGE_ALIGNMENT
        assert page_bytes(plan, layer) % PAGE_ALIGNMENT == 0


@pytest.mark.vllm
def test_the_spec_page_is_the_layer_page(plan):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvc.serving.vllm.spec import plan_spec

    engine_spec = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.float32)
    for layer in (0, plan.num_layers - 1):
        spec = plan_spec(plan, block_pages([plan]), layer, engine_spec)
        assert spec.page_size_bytes == page_bytes(plan, layer)
        assert spec.max_memory_usage_bytes(None) == spec.page_size_bytes  # one page whatever the length
        assert spec.max_num_blocks_per_req(None, 100_000) == 1
        assert not spec.prefix_cacheable


def test_a_store_on_pages_writes_into_the_pages(plan):
    """Strided pages (another layer's bytes between blocks), gathered and scattered, or used in place."""
    generator = torch.Generator().manual_seed(0)
    layer, blocks = 3, 4
    stride = page_bytes(plan, layer) + 2 * PAGE_ALIGNMENT
    raw = torch.zeros(blocks, stride, dtype=torch.int8)[:, PAGE_ALIGNMENT:PAGE_ALIGNMENT + page_bytes(plan, layer)]
    pages = PageViews(plan, layer, raw)
    assert set(pages.fields) == {field.name for field in page_fields(plan, layer)}
    store = LayerStore(plan, layer)
    keys, values = torch.randn(2, 1, plan.num_kv_heads, 40, plan.head_dim, generator=generator)
    queries = torch.randn(1, plan.num_attention_heads, 40, plan.head_dim, generator=generator)
    classes = torch.zeros(1, 40, dtype=torch.uint8)
    store.attach(pages.block(2))
    store.prefill(keys, values, classes, torch.zeros(1, dtype=torch.int32), queries[:, :, -32:])
    reference = LayerStore(plan, layer)
    reference.allocate(1, "cpu")
    reference.prefill(keys, values, classes, torch.zeros(1, dtype=torch.int32), queries[:, :, -32:])
    assert int(pages.fields["seen"][2]) == 40 and int(pages.fields["seen"][1]) == 0  # block 2 only
    assert torch.equal(pages.fields["positions"][2], reference.positions[0])
    state = pages.gather(torch.tensor([2]))
    store.attach(state, prefilled=True)
    step = [torch.randn(1, heads, 1, plan.head_dim, generator=generator)
            for heads in (plan.num_attention_heads, plan.num_kv_heads, plan.num_kv_heads)]
    output = store.extend(*step, torch.zeros(1, 1, dtype=torch.uint8))
    pages.scatter(torch.tensor([2]), state)
    assert torch.equal(output, reference.extend(*step, torch.zeros(1, 1, dtype=torch.uint8)))
    assert int(pages.fields["seen"][2]) == 41
    assert torch.equal(pages.fields["positions"][2], reference.positions[0])


@pytest.mark.parametrize("kv_bits", [0, 8])
@pytest.mark.parametrize("class_slots", [0, 3], ids=["a starved head", "class rings"])
def test_a_batch_writes_back_the_slots_it_wrote_and_leaves_the_pages_as_whole_pages_would(kv_bits, class_slots):
    """A batch of decoding requests runs on copies of their pages; writing back only the slots the
    steps wrote (`LayerStore.take_writes`) must leave every page as writing back the whole pages
    does: sinks, class rings, windows, window tokens moving into the heavy hitters, heavy-only heads
    replacing their weakest, and a head without slots that repeats another's writes."""
    from kvc.policies.kinds import Budget
    from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT
    from tests.runtime.test_cache_store import GROUP, HEAD_DIM, prompt, tiny_plan

    generator = torch.Generator().manual_seed(3)
    kinds = ["special+punct+frequency+local", "punct", "frequency", "local", "full"]
    plan = tiny_plan([kinds], batch=1, class_slots=class_slots, kv_bits=kv_bits, max_len=64,
                     budget=Budget(sinks=2, window=3, heavy=4))
    assert (int(plan.capacity[0, 1]) == 0) == (class_slots == 0)
    blocks, heads = torch.tensor([4, 0, 2]), len(kinds)
    store = LayerStore(plan, 0)
    whole, written = (PageViews(plan, 0, torch.zeros(5, page_bytes(plan, 0), dtype=torch.uint8)) for _ in range(2))
    for block in blocks.tolist():
        keys, values, queries, classes = prompt(generator, 1, heads, 12)
        store.attach(whole.block(block))
        store.prefill(keys, values, classes, torch.zeros(1, dtype=torch.int32), queries[:, :, -4:])
    for name, view in written.fields.items():
        view.copy_(whole.fields[name])
    moved = False
    for _ in range(30):
        query = torch.randn(3, heads * GROUP, 1, HEAD_DIM, generator=generator)
        key, value = (torch.randn(3, heads, 1, HEAD_DIM, generator=generator) for _ in range(2))
        draw = torch.rand(3, 1, generator=generator)
        classes = torch.where(draw < 0.2, SPECIAL_BIT, torch.where(draw < 0.5, PUNCT_BIT, 0)).to(torch.uint8)
        outputs = []
        for pages, track in ((whole, False), (written, True)):
            state = pages.gather(blocks)
            store.attach(state, prefilled=True)
            store.writes = [] if track else None
            outputs.append(store.extend(query, key, value, classes))
            slots = store.take_writes() if track else None
            moved = moved or (slots is not None and slots.shape[1] > heads)  # a window token joined the heavy hitters
            pages.scatter(blocks, state, slots)
        assert torch.equal(*outputs)
        for name, view in whole.fields.items():
            assert torch.equal(view, written.fields[name]), name
    assert moved
    store.attach(written.gather(blocks), prefilled=True)  # a chunk of several tokens: every slot counts as written
    store.writes = []
    store.extend(query.expand(-1, -1, 2, -1), key.expand(-1, -1, 2, -1), value.expand(-1, -1, 2, -1),
                 classes.expand(-1, 2))
    assert torch.equal(store.take_writes(), torch.arange(store.positions.shape[1]).expand(3, -1))


def test_a_batch_on_a_layer_without_slots_writes_back_its_counters():
    from kvc.policies.kinds import Budget
    from tests.runtime.test_cache_store import HEAD_DIM, prompt, tiny_plan

    generator = torch.Generator().manual_seed(0)
    plan = tiny_plan([["punct", "punct"]], batch=1, class_slots=0, budget=Budget(sinks=0))
    pages, store = PageViews(plan, 0, torch.zeros(3, page_bytes(plan, 0), dtype=torch.uint8)), LayerStore(plan, 0)
    for block in (0, 2):
        keys, values, queries, classes = prompt(generator, 1, 2, 5)
        store.attach(pages.block(block))
        store.prefill(keys, values, classes, torch.zeros(1, dtype=torch.int32), queries[:, :, -2:])
    blocks = torch.tensor([2, 0])
    state = pages.gather(blocks)
    store.attach(state, prefilled=True)
    store.writes = []
    store.extend(*(torch.randn(2, heads, 1, HEAD_DIM, generator=generator) for heads in (4, 2, 2)),
                 torch.zeros(2, 1, dtype=torch.uint8))
    slots = store.take_writes()
    assert slots.shape == (2, 0) and store.writes is None
    pages.scatter(blocks, state, slots)
    assert pages.fields["seen"].tolist() == [6, 0, 6]


@pytest.mark.vllm
def test_the_manager_gives_a_request_one_block_and_takes_it_back():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kvc.serving.vllm.spec import OnePageManager

    pool = BlockPool(num_gpu_blocks=4, enable_caching=False, hash_block_size=128)  # one null block + 3
    free = pool.get_num_free_blocks()
    spec = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.float32)
    manager = OnePageManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0,
                             scheduler_block_size=128)
    for request, tokens in (("short", 5), ("long", 1000)):
        assert manager.get_num_blocks_to_allocate(request, tokens, [], 0, 0, tokens) == 1
        assert len(manager.allocate_new_blocks(request, tokens, tokens)) == 1
    assert manager.get_num_blocks_to_allocate("long", 1040, [], 1000, 1000, 1040) == 0
    assert manager.allocate_new_blocks("long", 1040, 1040) == []  # growing never takes a second block
    assert pool.get_num_free_blocks() == free - 2
    manager.free("short")  # finished
    manager.free("long")  # aborted: the scheduler frees the same way
    assert pool.get_num_free_blocks() == free


@pytest.mark.parametrize("ranks", [1, 3])
def test_a_rank_holds_exactly_its_heads(plan, ranks):
    count = plan.num_kv_heads // ranks
    slices = [plan.rank_slice(rank, ranks) for rank in range(ranks)]
    for rank, part in enumerate(slices):
        heads = slice(rank * count, (rank + 1) * count)
        assert part.num_kv_heads == count and part.num_attention_heads == plan.num_attention_heads // ranks
        assert torch.equal(part.capacity, plan.capacity[:, heads])
        assert torch.equal(part.head_bytes(), plan.head_bytes()[:, heads])
        for layer in range(plan.num_layers):  # each head's segment: its capacity, in its original order
            assert [cap for _, cap in LayerStore(part, layer).layout.segments] == plan.capacity[layer, heads].tolist()
    slot_bytes = sum(part.kv_bytes + part.score_bytes + part.position_bytes for part in slices)
    assert slot_bytes == plan.kv_bytes + plan.score_bytes + plan.position_bytes


def test_ranks_must_divide_the_kv_heads(plan):
    from kvc.policies.errors import KvcError

    with pytest.raises(KvcError, match="^--tensor-parallel-size 2 does not divide the plan's 3 KV heads$"):
        plan.rank_slice(0, 2)


def test_a_plan_compiled_for_its_ranks_needs_no_more_than_its_share_and_others_are_warned_about(caplog, monkeypatch):
    """Served over N ranks, every rank's blocks hold the largest rank's bytes: a plan compiled over all
    heads at once wastes the difference (warned, with the command that fixes it), one compiled for
    the N ranks does not."""
    from kvc.compiler import compile_policy
    from kvc.policies.synthetic import synthetic_policy
    from kvc.serving.vllm.engine import WARNED_ENV, warn_unbalanced
    from kvc.serving.vllm.pages import rank_imbalance

    monkeypatch.setenv(WARNED_ENV, "")  # restored (unset) after the test

    policy = synthetic_policy(24, 16, 4, 64, seed=2, max_position_embeddings=8192, vocab_size=5000)
    unbalanced = compile_policy(policy, 0.1, max_len=8192)
    balanced = compile_policy(policy, 0.1, max_len=8192, tensor_parallel_size=4)
    with caplog.at_level("WARNING"):
        assert warn_unbalanced(balanced, 4) == rank_imbalance(balanced, 4) < 1.001
        assert not caplog.records
        assert warn_unbalanced(unbalanced, 4) == rank_imbalance(unbalanced, 4) > 1.1
        warn_unbalanced(unbalanced, 4)  # the engine's own process checks again: warned once
    assert [record.getMessage() for record in caplog.records] == [
        f"kvc: the plan was compiled for 1 tensor-parallel rank(s) and is served over 4: every rank's blocks hold the "
        f"largest rank's share, {rank_imbalance(unbalanced, 4):.2f}x the mean rank's; `kvc compile POLICY "
        "--tensor-parallel-size 4` balances them"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert warn_unbalanced(unbalanced, 1) == 1.0 and warn_unbalanced(balanced, 2) < 1.01
    assert not caplog.records
