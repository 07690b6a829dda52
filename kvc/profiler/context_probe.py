"""How many of a context's keys each KV head holds on to when the model is asked to repeat it.

KVzip (arXiv 2505.23416) scores a context's keys by the reconstruction probe (`kvc.policies.probes`)
and keeps the best pairs of all heads together, not a fixed number per head: heads differ a lot in
how many keys score high, so an equal budget per head wastes slots on some and starves others. A
kvc plan is static, so the profiler measures each KV head's habit once: each profiling prompt (its
first `PROBE_TOKENS` tokens) is followed by the request and a copy of it, and for every point τ of
`SCORE_POINTS` the head's curve holds the share of the prompt's keys whose score reaches τ (a key's
score: its largest attention probability over the copy's queries and the query group, max-pooled
over `POOL_KERNEL` keys, as the runtime scores), averaged over the prompts. Read at one threshold
for all heads, the curves give each head's share of a budget (`kvc.compiler.retrieval`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvc.policies.probes import POOL_KERNEL, RECONSTRUCT_PROMPT

SCORE_POINTS = tuple(round(10 ** (exponent / 4), 8) for exponent in range(-24, 1))  # 1e-6 ... 1, 4 per decade
PROBE_TOKENS = 2048  # the longest part of a prompt the probe repeats
QUERY_BLOCK = 256  # copy queries per block of probabilities
CONTEXT_PROBE_SCHEME = (
    f"reconstruction probe: each prompt's first <= {PROBE_TOKENS} tokens, {RECONSTRUCT_PROMPT!r}, their copy "
    "(special tokens left out); a key's score: its largest attention probability over the copy's queries and "
    f"the query group, max-pooled over {POOL_KERNEL} keys; curve: share of the keys scoring >= each point, "
    "mean over prompts"
)


def probe_sequence(token_ids: list[int], request: list[int], special: set[int], limit: int) -> tuple[list[int], int]:
    """The prompt's first tokens, the request and their copy, as one sequence, and the context's length.

    The context is as long as `PROBE_TOKENS` and the model's `limit` of positions allow for the request
    and the copy after it."""
    room = min(PROBE_TOKENS, (limit - len(request)) // 2)
    context = token_ids[:room]
    return context + request + [token for token in context if token not in special], len(context)


class ProbeObserver:
    """The capture observer of a probe sequence: the model's causal attention, and per layer the
    share of the context's keys scoring at or above each point, summed over prompts."""

    def __init__(self, num_layers: int, progress=None):
        self.sums: list[torch.Tensor | None] = [None] * num_layers
        self.prompts = 0
        self.progress = progress

    def start(self, context: int, name: str) -> None:
        """A probe sequence whose first `context` tokens are the prompt's (progress reports `name`)."""
        self.context, self.name, self.layers_seen = context, name, 0
        self.prompts += 1

    def attend(self, layer, query, key, value, attention_mask, scaling):
        layer = self.layers_seen if layer is None else layer
        self.layers_seen += 1
        group = query.shape[1] // key.shape[1]
        mask = None if attention_mask is None else attention_mask[..., :key.shape[2]]
        output = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
                                                attn_mask=mask, is_causal=mask is None, scale=scaling)
        shares = score_shares(context_scores(query[0], key[0], self.context, scaling))
        self.sums[layer] = shares if self.sums[layer] is None else self.sums[layer] + shares
        if self.progress is not None:
            self.progress(self.name)
        return output.transpose(1, 2)

    def curves(self) -> list[torch.Tensor]:
        """Per layer (kv_heads, points) mean shares over the prompts."""
        return [total / self.prompts for total in self.sums]


def context_scores(query: torch.Tensor, key: torch.Tensor, context: int, scale: float) -> torch.Tensor:
    """(kv_heads, context) each context key's largest probability over the queries after the
    context's end that copy it, and the query group, max-pooled. query (heads, n, d), key (kv_heads, n, d)."""
    heads, length, head_dim = query.shape
    kv_heads = key.shape[0]
    grouped = query.float().reshape(kv_heads, heads // kv_heads, length, head_dim)
    keys_t = key.float().transpose(-1, -2)[:, None]  # (kv_heads, 1, d, n), against each query group
    positions = torch.arange(length, device=key.device)
    best = torch.zeros(kv_heads, context, device=key.device)
    for start in range(context, length, QUERY_BLOCK):  # every query after the context: the request's and the copy's
        rows = positions[start:start + QUERY_BLOCK]
        logits = grouped[:, :, start:start + QUERY_BLOCK] @ keys_t * scale  # (kv_heads, group, rows, n)
        logits.masked_fill_(positions[None, :] > rows[:, None], float("-inf"))
        best = torch.maximum(best, torch.softmax(logits, -1)[..., :context].amax((1, 2)))
    return F.max_pool1d(best[:, None], POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)[:, 0]


def score_shares(scores: torch.Tensor) -> torch.Tensor:
    """(kv_heads, points) float64: the share of each head's keys scoring at or above each point."""
    points = torch.tensor(SCORE_POINTS, dtype=scores.dtype, device=scores.device)
    return (scores[..., None] >= points).double().mean(1).cpu()
