"""Compressing a context before its question is known: probes that score it, read after it, never kept.

A frequency (SnapKV-style) head picks its heavy hitters by the attention they get from the prompt's
last queries. When the context is compressed before the question (a cached document, a system
prompt), those queries are the end of the context, not the question. A probe is text the model
reads after the context, over the context's full keys and values, before the context is
compressed: each context key scores its largest attention probability over the probe's queries
and the query group, and those scores replace the observation window's (`LayerStore.prefill`). The
probe's own keys and values are never stored, and the cache counts the context only, so a later
question's positions continue from the context's end. KVzip's idea (arXiv 2505.23416): the best
question-independent probe makes the model repeat the context, so every token the context could
be asked about is attended by its copy.

Probes: `window` (none: the context's last queries, as a prompt with its question), `generic` (a
short fixed question about the text) and `reconstruct` (a request to repeat the context, then the
context again, read in parts of at most `PART_TOKENS` tokens, each after the request and attending
to the whole context, as KVzip's chunked scoring does: one more pass over the context's tokens,
and positions for the context and one part). A context the model has no positions left after is refused.
`expected` reads nothing after the context: each key scores the attention the queries to come are
expected to give it (`kvc.runtime.expected_attention`, from the context's own queries).
`reconstruct+expected` adds the two, each a share of its head's total: a key either keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvc.models import architecture
from kvc.policies.errors import KvcError
from kvc.policies.probes import DEFAULT_PROBE, RECONSTRUCT_PROMPT, check_probe
from kvc.runtime.apply import cache_keyword
from kvc.runtime.expected_attention import expected_attention, rotary_frequencies
from kvc.runtime.kernels import pool_scores
from kvc.runtime.shared_prefill import SharedLayer, SharedPrefill

REREADING = ("reconstruct", "reconstruct+expected")  # probes that read the context again after it
GENERIC_PROBE = "\n\nQuestion: What does the text above say?\nAnswer:"
PART_TOKENS = 2048  # the longest part of the context one reconstruction forward repeats (KVzip's chunk)
SHORTEST_PART = 64  # fewer positions left after the context than the request and this: refused
QUERY_BLOCK = 256  # probe queries per block of `probe_attention`


@dataclass(frozen=True)
class Probe:
    """Token ids read after a context: `request`, followed in each forward by one part of `body`
    (neither: no forward); `expected`: the context's expected attention joins their scores."""

    request: list[int]
    body: list[int]
    expected: bool = False

    def parts(self, room: int) -> list[list[int]]:
        """The probe's forwards when `room` positions follow the context: the request alone, or
        the request before each part of the body, as long as the room and `PART_TOKENS` allow."""
        if not self.body:
            return [self.request] if self.request else []
        size = min(PART_TOKENS, room - len(self.request))
        return [self.request + self.body[first:first + size] for first in range(0, len(self.body), size)]

    def shortest_room(self) -> int:
        """The fewest positions after the context this probe can be read in."""
        return len(self.request) + min(SHORTEST_PART, len(self.body))


def make_probe(tokenizer, context_ids: list[int], probe: str) -> Probe | None:
    """The probe `probe` after `context_ids` (None for `window`)."""
    check_probe(probe)
    if probe == "window":
        return None
    if probe == "generic":
        return Probe(tokenizer(GENERIC_PROBE, add_special_tokens=False).input_ids, [])
    if probe == "expected":
        return Probe([], [], expected=True)
    special = set(tokenizer.all_special_ids)
    return Probe(tokenizer(RECONSTRUCT_PROMPT, add_special_tokens=False).input_ids,
                 [token for token in context_ids if token not in special], expected=probe == "reconstruct+expected")


def prefill_context(model, cache, context_ids: list[int], probe: Probe | None, **forward) -> None:
    """Prefill `cache` (a `CompressedCache` or a `SharedPrefill`) with the context, scored by the probe.

    The model must run kvc attention (`kvc.apply`). Caches that do not score by probes
    (`probe_scoring=False`), or no probe, get the context's plain prefill; the others keep what
    the probe's queries attend to most. Every cache counts only the context's tokens.
    """
    members = cache.caches if isinstance(cache, SharedPrefill) else [cache]
    keyword = cache_keyword(model)
    inputs = torch.tensor([context_ids], device=model.device)
    if probe is None or not any(member.probe_scoring for member in members):
        model(input_ids=inputs, **{keyword: cache}, logits_to_keep=1, **forward)
        return
    room = (getattr(model.config, "max_position_embeddings", None) or 2 ** 62) - len(context_ids)
    if room < probe.shortest_room():
        raise KvcError(f"the context ({len(context_ids)} tokens) leaves {room} of the model's positions, fewer "
                       f"than its probe needs ({probe.shortest_room()}); use a shorter context or "
                       "--context-probe window")
    frequencies = None
    if probe.expected:
        frequencies = rotary_frequencies(model)
        if frequencies is None or 2 * len(frequencies) != architecture(model.config.get_text_config()).head_dim:
            raise KvcError("the expected-attention probe needs rotary position embeddings over each head's whole "
                           "dimension; use --context-probe reconstruct")
    scorer = ContextScorer(members, frequencies)
    model(input_ids=inputs, **{keyword: scorer}, logits_to_keep=1, **forward)
    scorer.reading_probe = True
    for part in probe.parts(room):
        model(input_ids=torch.tensor([part], device=model.device), **{keyword: scorer}, logits_to_keep=1, **forward)
    scorer.store()


def probe_attention(query, keys, values, start, scale):
    """A probe's attention over the context and itself, and the context's scores, from one softmax.

    query (batch, q_heads, n, head_dim) the probe's; keys, values (batch, kv_heads, context + n,
    head_dim), the probe's last; start (batch,) the context's first non-padding position. Each
    probe query sees the context from `start` and the probe causally. Returns the attention output
    (batch, n, q_heads, head_dim) in the query's dtype, as an attention function returns it, and
    each context key's largest probability over the probe's queries and the query group
    (batch, kv_heads, context) float32, unpooled.
    """
    batch, q_heads, length, head_dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    context = total - length
    grouped = query.float().reshape(batch, kv_heads, q_heads // kv_heads, length, head_dim) * scale
    keys_t, values = keys.float().transpose(-1, -2), values.float()
    positions = torch.arange(total, device=keys.device)
    padding = int(start.max())  # the context's left padding, hidden from every query
    outputs, best = [], torch.zeros(batch, kv_heads, context, device=keys.device)
    for first in range(0, length, QUERY_BLOCK):
        rows = torch.arange(first, min(first + QUERY_BLOCK, length), device=keys.device)
        block = grouped[:, :, :, first:first + QUERY_BLOCK].flatten(2, 3)  # (batch, kv_heads, group * rows, dim)
        logits = (block @ keys_t).unflatten(2, (-1, len(rows)))  # (batch, kv_heads, group, rows, total)
        logits[..., context:].masked_fill_(positions[None, :length] > rows[:, None], float("-inf"))  # causal
        if padding:
            logits[..., :padding].masked_fill_((positions[:padding] < start[:, None])[:, None, None, None],
                                               float("-inf"))
        probs = torch.softmax(logits, -1)
        outputs.append((probs @ values[:, :, None]).flatten(1, 2))  # (batch, q_heads, rows, dim)
        best = torch.maximum(best, probs[..., :context].amax((2, 3)))
    output = torch.cat(outputs, 2).transpose(1, 2).to(query.dtype)
    return output, best


def combined_scores(probed: torch.Tensor | None, expected: torch.Tensor | None) -> torch.Tensor:
    """A probe's scores and expected attention's (batch, kv_heads, context), either None: their sum
    as shares of each head's total, so that neither's scale decides; one alone as it is."""
    if probed is None or expected is None:
        return expected if probed is None else probed
    share = lambda scores: scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)  # noqa: E731
    return share(probed) + share(expected)


class ScoringLayer(SharedLayer):
    """One layer of a `ContextScorer`: holds the context's keys and values, then scores them by the probe."""

    def __init__(self, members, scorer: ContextScorer):
        super().__init__(members)
        self.scorer = scorer
        self.keys = self.values = self.best = self.expected = self.scale = None

    @property
    def reading_probe(self) -> bool:
        return self.scorer.reading_probe

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.reading_probe:
            self.keys, self.values = key_states, value_states
            return super().update(key_states, value_states)
        return torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)

    def compress(self, query, keys, values, scale) -> None:
        """After the context's attention: members that do not score by probes compress it; with
        expected attention, the context's keys get its scores."""
        self.scale = scale
        for member in self.members:
            if not member.cache.probe_scoring:
                member.compress(query, keys, values, scale)
        if self.scorer.frequencies is not None:
            start = self.members[0].cache.observed.start
            self.expected = expected_attention(query, keys, values, start, scale, self.scorer.frequencies)

    def read_probe(self, query, keys, values, scale) -> torch.Tensor:
        """A probe forward's attention (its output, as an attention function returns it); its scores
        of the context's keys join the largest so far."""
        output, scores = probe_attention(query, keys, values, self.members[0].cache.observed.start, scale)
        self.best = scores if self.best is None else torch.maximum(self.best, scores)
        return output

    def store(self) -> None:
        """Each probe-scored member keeps the context's keep-sets by the probe's scores (with
        expected attention too, the sum of each one's share of its head's total)."""
        self.best = combined_scores(self.best, self.expected)
        for member in self.members:
            if member.cache.probe_scoring:
                observed = member.cache.observed
                scores = pool_scores(self.best, observed.start, member.store.plan.pool_kernel)
                member.store.prefill(self.keys, self.values, observed.classes, observed.start, None, self.scale,
                                     scores=scores, questions_later=True)
        self.keys = self.values = self.best = self.expected = None

    def get_seq_length(self):
        return 0 if self.keys is None else self.keys.shape[2]

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        length = query_length.shape[-1] if isinstance(query_length, torch.Tensor) else query_length
        return self.get_seq_length() + length, 0


class ContextScorer(SharedPrefill):
    """The cache of a context's prefill and of the probe forwards after it.

    The context's forward goes to every member as a shared prefill does, except that members
    scoring by probes wait; the probe's forwards attend to the context's full keys and values and
    reach no member (their tokens are neither stored nor counted); `store()` then fills the waiting
    members by the probe's scores."""

    def __init__(self, caches, frequencies: torch.Tensor | None = None):
        super().__init__(caches)
        self.layers = [ScoringLayer(layer.members, self) for layer in self.layers]
        self.reading_probe = False  # set once the context's forward is done
        self.frequencies = frequencies  # RoPE's, when expected attention scores the context

    def observe(self, input_ids, attention_mask) -> None:
        if not self.reading_probe:
            super().observe(input_ids, attention_mask)

    def finish(self) -> None:
        if not self.reading_probe:
            super().finish()

    def store(self) -> None:
        for layer in self.layers:
            layer.store()
