"""Expected attention: how much the queries still to come will attend each key of a context.

Expected Attention (Devoto, Jeblick and Jégou, arXiv 2510.00636) models the queries that follow a
context as a Gaussian N(mu, Sigma). For a key k the expected unnormalised attention is then in
closed form, E[exp(scale q.k)] = exp(scale mu.k + scale^2 k'Sigma k / 2), and a key's share of it,
times the norm of its value, is what the key is expected to add to the heads' output. The queries
of the context's last `STATISTICS_QUERIES` tokens give mu and Sigma, each first carried by RoPE to
the positions after the context: a query at distance d from a future position p + t is rotated by
(d + t) times each frequency, averaged over t = 1 .. `HORIZON` (a contraction of the rotation, the
mean of cosines and sines). No forward beyond the context's own is needed.
"""

from __future__ import annotations

import torch

STATISTICS_QUERIES = 128  # the context's last queries whose mean and covariance model the future ones
HORIZON = 512  # future positions the rotation is averaged over


def rotary_frequencies(model) -> torch.Tensor | None:
    """The model's RoPE inverse frequencies (head_dim / 2,), as its rotary embedding holds them, or None."""
    for module in model.modules():
        frequencies = getattr(module, "inv_freq", None)
        if isinstance(frequencies, torch.Tensor):
            return frequencies.detach().float()
    return None


def averaged_rotation(distances: torch.Tensor, frequencies: torch.Tensor, horizon: int = HORIZON):
    """Mean cosine and sine of (distance + t) * frequency over t = 1 .. horizon: (n, head_dim / 2) each."""
    steps = torch.arange(1, horizon + 1, dtype=torch.float32, device=frequencies.device)
    angles = (distances.float()[:, None, None] + steps[None, :, None]) * frequencies[None, None, :]
    return angles.cos().mean(1), angles.sin().mean(1)


def expected_attention(query, keys, values, start, scale, frequencies, statistics: int = STATISTICS_QUERIES):
    """Each context key's expected share of the future queries' attention, times its value's norm.

    query (batch, q_heads, n, head_dim) the context's queries after RoPE (rotate-half layout); keys,
    values (batch, kv_heads, n, head_dim); start (batch,) the first non-padding position;
    frequencies (head_dim / 2,) RoPE's. Returns (batch, kv_heads, n) float32, the largest over each
    KV head's query group, zero before `start`."""
    batch, q_heads, length, head_dim = query.shape
    kv_heads, half = keys.shape[1], head_dim // 2
    count = min(statistics, length)
    positions = torch.arange(length - count, length, device=query.device)
    cos, sin = averaged_rotation(length - 1 - positions, frequencies.to(query.device))
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    recent = query[:, :, -count:].float()
    turned = torch.cat([-recent[..., half:], recent[..., :half]], -1)
    future = recent * cos + turned * sin  # (batch, q_heads, count, head_dim)
    weights = (positions[None, :] >= start[:, None]).float()  # padding queries model nothing
    weights = (weights / weights.sum(-1, keepdim=True).clamp_min(1))[:, None, :, None]
    mean = (future * weights).sum(2)  # (batch, q_heads, head_dim)
    centred = (future - mean[:, :, None]) * weights.sqrt()
    covariance = centred.transpose(-1, -2) @ centred  # (batch, q_heads, head_dim, head_dim)
    grouped = keys.float().repeat_interleave(q_heads // kv_heads, 1)  # (batch, q_heads, n, head_dim)
    logits = scale * (grouped @ mean[..., None])[..., 0] + 0.5 * scale ** 2 * ((grouped @ covariance) * grouped).sum(-1)
    padding = torch.arange(length, device=query.device)[None, :] < start[:, None]
    logits = logits.masked_fill(padding[:, None], float("-inf"))
    shares = torch.softmax(logits, -1) * values.float().norm(dim=-1).repeat_interleave(q_heads // kv_heads, 1)
    return shares.unflatten(1, (kv_heads, q_heads // kv_heads)).amax(2)
