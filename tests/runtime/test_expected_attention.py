"""Expected attention (`kvc.runtime.expected_attention`) against a reference written with complex
rotations, its closed form against sampled Gaussian queries, and the probes that use it: the keys an
`expected` or `reconstruct+expected` probe keeps are the top of those scores (shares summed with the
reconstruction's), the padding and ragged sizes included."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvc
from kvc.policies.errors import KvcError
from kvc.runtime import probe as probe_module
from kvc.runtime.apply import cache_keyword
from kvc.runtime.expected_attention import averaged_rotation, expected_attention, rotary_frequencies
from kvc.runtime.handmade import handmade_plan
from kvc.runtime.probe import combined_scores, make_probe, prefill_context
from tests.runtime.test_probe import CONTEXT, peaked_llama, reference_probe_scores
from tests.runtime.test_step import tiny_llama


def as_complex(vectors):
    """Rotate-half layout (first half real parts, second half imaginary) as complex pairs."""
    half = vectors.shape[-1] // 2
    return torch.complex(vectors[..., :half].double(), vectors[..., half:].double())


def future_statistics(query, start, frequencies, statistics, horizon):
    """Mean and covariance (real, head_dim) of the last `statistics` queries, each multiplied by the
    mean over t of exp(i (d + t) f) for its distance d to the context's last position."""
    batch, q_heads, length, head_dim = query.shape
    count = min(statistics, length)
    means = torch.zeros(batch, q_heads, head_dim, dtype=torch.float64)
    covariances = torch.zeros(batch, q_heads, head_dim, head_dim, dtype=torch.float64)
    for row in range(batch):
        positions = [p for p in range(length - count, length) if p >= int(start[row])]
        carried = []
        for position in positions:
            turns = torch.stack([torch.exp(1j * (length - 1 - position + t) * frequencies.double())
                                 for t in range(1, horizon + 1)]).mean(0)
            moved = as_complex(query[row, :, position]) * turns
            carried.append(torch.cat([moved.real, moved.imag], -1))  # (q_heads, head_dim)
        carried = torch.stack(carried, 1)  # (q_heads, count, head_dim)
        means[row] = carried.mean(1)
        centred = carried - means[row][:, None]
        covariances[row] = centred.transpose(-1, -2) @ centred / len(positions)
    return means, covariances


def reference_expected(query, keys, values, start, scale, frequencies, statistics, horizon):
    means, covariances = future_statistics(query, start, frequencies, statistics, horizon)
    batch, q_heads, length, _ = query.shape
    group = q_heads // keys.shape[1]
    scores = torch.zeros(batch, keys.shape[1], length, dtype=torch.float64)
    for row in range(batch):
        for head in range(q_heads):
            key = keys[row, head // group].double()
            logits = scale * key @ means[row, head] + 0.5 * scale ** 2 * torch.einsum(
                "nd,de,ne->n", key, covariances[row, head], key)
            logits[:int(start[row])] = float("-inf")
            shares = torch.softmax(logits, -1) * values[row, head // group].double().norm(dim=-1)
            scores[row, head // group] = torch.maximum(scores[row, head // group], shares)
    return scores.float()


@pytest.mark.parametrize("length, statistics, starts", [(40, 16, [0]), (7, 16, [0]), (1, 4, [0]),
                                                        (50, 64, [0, 9]), (33, 8, [30, 2])])
def test_expected_attention_is_the_complex_rotation_reference(length, statistics, starts):
    generator = torch.Generator().manual_seed(length * 7 + statistics)
    batch, head_dim = len(starts), 16
    query = torch.randn(batch, 6, length, head_dim, generator=generator)
    keys, values = (torch.randn(batch, 2, length, head_dim, generator=generator) for _ in range(2))
    frequencies = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    start = torch.tensor(starts)
    scores = expected_attention(query, keys, values, start, 0.25, frequencies, statistics)
    expected = reference_expected(query, keys, values, start, 0.25, frequencies, statistics, 512)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-4)
    for row, first in enumerate(starts):
        assert (scores[row, :, :first] == 0).all() and (scores[row, :, first:] > 0).all()


def test_the_closed_form_is_the_mean_attention_of_sampled_gaussian_queries():
    """With one query per KV head and unit values, the scores are E[exp(scale q.k)] over q ~ N(mu,
    Sigma), normalised over the keys: here estimated from 400,000 sampled queries."""
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 1, 24, 8, generator=generator) * 0.8 + torch.linspace(-1, 1, 8)
    keys = torch.randn(1, 1, 24, 8, generator=generator)
    values = F.normalize(torch.randn(1, 1, 24, 8, generator=generator), dim=-1)
    frequencies = 100.0 ** (-torch.arange(0, 8, 2).float() / 8)
    scores = expected_attention(query, keys, values, torch.tensor([0]), 0.5, frequencies, 24)
    mean, covariance = future_statistics(query, torch.tensor([0]), frequencies, 24, 512)
    gaussian = torch.distributions.MultivariateNormal(mean[0, 0], covariance[0, 0] + 1e-9 * torch.eye(8))
    samples = gaussian.sample((400_000,))
    sampled = torch.exp(0.5 * samples @ keys[0, 0].double().T).mean(0)
    torch.testing.assert_close(scores[0, 0].double(), sampled / sampled.sum(), atol=2e-3, rtol=3e-2)


def test_averaged_rotation_is_the_mean_of_cosines_and_sines():
    cos, sin = averaged_rotation(torch.tensor([0, 5]), torch.tensor([1.0, 0.1]), horizon=3)
    angles = torch.tensor([[[1.0, 0.1], [2.0, 0.2], [3.0, 0.3]], [[6.0, 0.6], [7.0, 0.7], [8.0, 0.8]]])
    torch.testing.assert_close(cos, angles.cos().mean(1))
    torch.testing.assert_close(sin, angles.sin().mean(1))


def test_the_model_s_rotary_frequencies_are_found(smollm):
    loaded = tiny_llama(smollm.tokenizer)
    torch.testing.assert_close(rotary_frequencies(loaded.model), loaded.model.model.rotary_emb.inv_freq.float())
    assert rotary_frequencies(torch.nn.Linear(2, 2)) is None


def test_combined_scores_add_shares_of_each_head_s_total():
    probed = torch.tensor([[[1.0, 3.0, 0.0, 0.0]]])
    expected = torch.tensor([[[0.0, 0.0, 10.0, 30.0]]])
    torch.testing.assert_close(combined_scores(probed, expected), torch.tensor([[[0.25, 0.75, 0.25, 0.75]]]))
    assert combined_scores(probed, None) is probed and combined_scores(None, expected) is expected


@pytest.mark.parametrize("probe", ["expected", "reconstruct+expected"])
def test_an_expected_probe_keeps_the_top_of_its_scores(smollm, monkeypatch, probe):
    monkeypatch.setattr(probe_module, "PART_TOKENS", 16)
    tokenizer = smollm.tokenizer
    loaded = peaked_llama(tokenizer)
    model = loaded.model
    heavy, window = 5, 4
    plan = handmade_plan(model.config, tokenizer, "frequency+local", 160, heavy=heavy, window=window)
    context = tokenizer(CONTEXT).input_ids
    read = make_probe(tokenizer, context, probe)
    seen = []  # what each layer's scorer handed expected attention: the context's queries, keys, values

    def recorded(query, keys, values, start, scale, frequencies):
        seen.append((query, keys, values, start, scale, frequencies))
        return expected_attention(query, keys, values, start, scale, frequencies)

    monkeypatch.setattr(probe_module, "expected_attention", recorded)
    with torch.no_grad():
        with kvc.apply(loaded, plan) as applied:
            cache = applied.cache()
            prefill_context(model, cache, context, read)
        reference = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([context]), **{cache_keyword(model): reference})
        assert len(seen) == 2
        for layer, (query, keys, values, start, scale, frequencies) in enumerate(seen):
            torch.testing.assert_close(keys, reference.layers[layer].keys)  # this layer's keys, after RoPE
            assert query.shape == (1, 4, len(context), 16) and start.tolist() == [0] and scale == 16 ** -0.5
            torch.testing.assert_close(frequencies, model.model.rotary_emb.inv_freq.float())
        scores = torch.stack([reference_expected(query, keys, values, start, scale, frequencies, 128, 512)[0]
                              for query, keys, values, start, scale, frequencies in seen])
        if probe == "reconstruct+expected":
            model.set_attn_implementation("eager")
            probed = reference_probe_scores(model, context, read.parts(256 - len(context)))
            model.set_attn_implementation("sdpa")
            scores = probed / probed.sum(-1, keepdim=True) + scores / scores.sum(-1, keepdim=True)
    pooled = F.max_pool1d(scores, plan.pool_kernel, stride=1, padding=plan.pool_kernel // 2)
    length = len(context)
    for layer in range(2):
        for head in range(2):
            order = torch.sort(pooled[layer, head, :length - window], descending=True, stable=True).indices
            expected = sorted(list(range(length - window, length)) + order[:heavy].tolist())
            assert cache.kept_positions(layer)[head].tolist() == expected
    assert cache.get_seq_length() == length


@pytest.mark.parametrize("frequencies", [None, torch.ones(4)])
def test_a_model_without_rope_over_whole_heads_is_refused_before_any_work(smollm, monkeypatch, frequencies):
    """No rotary embedding, or one over part of each head (here 8 of 16 dimensions): one line, and
    the cache stays empty."""
    loaded = tiny_llama(smollm.tokenizer)
    monkeypatch.setattr(probe_module, "rotary_frequencies", lambda model: frequencies)
    plan = handmade_plan(loaded.model.config, smollm.tokenizer, "frequency+local", 160, heavy=5, window=4)
    context = smollm.tokenizer(CONTEXT).input_ids
    with kvc.apply(loaded, plan) as applied, torch.no_grad():
        cache = applied.cache()
        with pytest.raises(KvcError, match="rotary position embeddings over each head's whole dimension"):
            prefill_context(loaded.model, cache, context, make_probe(smollm.tokenizer, context, "reconstruct+expected"))
        assert not cache.layers[0].store.prefilled and cache.length == 0
