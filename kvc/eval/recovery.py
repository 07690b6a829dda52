"""The recovery task: how much of the full model's attention a method's cache still holds, on held-out text.

The perplexity sample's essay prefix is prefilled into the method's cache and its continuation fed
one token per step; after each step the positions every KV head holds are read from the cache. The
full model reads the same tokens once, and its attention rows at the continuation's queries give
the score: the mass A_ij on the positions j that query i's KV head held, averaged over queries,
query heads and layers (FastGen's recovery, on the runtime's real keep-sets over time). The text is
an essay, never a profiling prompt.
"""

from __future__ import annotations

import torch

from kvc.eval.perplexity import PerplexitySample, teacher_forced
from kvc.models import LoadedModel
from kvc.plan import Plan
from kvc.profiler.capture import capturing


class _RowRecorder:
    """The capture observer: SDPA output for the model, attention rows of the queries from `first` on, per layer."""

    def __init__(self, first: int):
        self.first = first
        self.rows: list[torch.Tensor] = []

    def attend(self, layer, query, key, value, attention_mask, scaling):
        group = query.shape[1] // key.shape[1]
        keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        length = query.shape[2]
        logits = torch.matmul(query[0, :, self.first:].float(), keys[0].float().transpose(-1, -2)) * scaling
        causal = torch.arange(length)[None, :] <= torch.arange(self.first, length)[:, None]
        self.rows.append(logits.masked_fill(~causal.to(logits.device), float("-inf")).softmax(-1).cpu())
        output = torch.nn.functional.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling)
        return output.transpose(1, 2)


def full_attention_rows(loaded: LoadedModel, token_ids: list[int], first: int) -> list[torch.Tensor]:
    """Per layer, the full model's attention rows (heads, queries from `first`, n) float32."""
    recorder = _RowRecorder(first)
    with capturing(loaded.model, recorder), torch.inference_mode():
        loaded.model.base_model(input_ids=torch.tensor([token_ids], device=loaded.model.device), use_cache=False)
    return recorder.rows


def held_positions(loaded: LoadedModel, plan: Plan, sample: PerplexitySample) -> tuple[list[list[list[torch.Tensor]]], int]:
    """Per continuation query (from the first continuation token on), per layer, per KV head: the
    positions the plan's cache holds when that query attends; and the cache's bytes."""
    steps = []
    for fed, (_, cache) in enumerate(teacher_forced(loaded, plan, sample)):
        if fed:  # after the prefill no continuation query has attended yet
            steps.append([layer.store.kept_positions(0) for layer in cache.layers])
    return steps, cache.nbytes()


def recovery(rows: list[torch.Tensor], held: list[list[list[torch.Tensor]]]) -> float:
    """Mean attention mass on the held positions; rows[layer] (heads, steps, n), held[step][layer][kv_head]."""
    total, count = 0.0, 0
    for layer, layer_rows in enumerate(rows):
        heads = layer_rows.shape[0]
        group = heads // len(held[0][layer])
        for step, step_held in enumerate(held):
            for head in range(heads):
                positions = step_held[layer][head // group]
                total += float(layer_rows[head, step, positions].sum())
                count += 1
    return total / count


def attention_recovery(loaded: LoadedModel, plan: Plan, sample: PerplexitySample) -> tuple[float, int]:
    """(recovery, cache bytes) of `plan` on the sample's continuation."""
    held, nbytes = held_positions(loaded, plan, sample)
    rows = full_attention_rows(loaded, sample.prefix_ids + sample.continuation_ids, len(sample.prefix_ids))
    return recovery(rows, held), nbytes
