"""Compressing a context before its question is known: probes that score it, run after it, never kept.

A frequency (SnapKV-style) head picks its heavy hitters by the attention they get from the prompt's
last queries. When the context is compressed before the question (a cached document, a system
prompt), those queries are the end of the context, not the question. A probe is text the model
reads right after the context in the same prefill forward; its queries replace the observation
window (`LayerStore.prefill`), each context key scoring its largest attention probability over
them and the query group; its own keys and values are never stored, and the cache counts the
context only, so a later question's positions continue from the context's end. KVzip's idea
(arXiv 2505.23416): the best question-independent probe makes the model repeat the context, so
every token the context could be asked about is attended by its copy.

Probes: `window` (none: the context's last queries, as a prompt with its question), `generic` (a
short fixed question about the text) and `reconstruct` (a request to repeat the context and the
context again: about one more prefill of the context, and positions for twice its length).
"""

from __future__ import annotations

import torch

from kvc.policies.errors import KvcError
from kvc.runtime.apply import cache_keyword

PROBES = ("window", "generic", "reconstruct")
GENERIC_PROBE = "\n\nQuestion: What does the text above say?\nAnswer:"
RECONSTRUCT_PROMPT = "\n\nRepeat the previous context exactly.\n"


def check_probe(probe: str, option: str = "--context-probe") -> str:
    """The probe's name, or one line refusing it."""
    if probe not in PROBES:
        raise KvcError(f"{option}: unknown probe {probe!r} (expected one of {', '.join(PROBES)})")
    return probe


def probe_ids(tokenizer, context_ids: list[int], probe: str) -> list[int]:
    """The token ids of a probe after `context_ids` (empty for `window`)."""
    check_probe(probe)
    if probe == "window":
        return []
    if probe == "generic":
        return tokenizer(GENERIC_PROBE, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids)
    body = [token for token in context_ids if token not in special]
    return tokenizer(RECONSTRUCT_PROMPT, add_special_tokens=False).input_ids + body


def prefill_context(model, cache, context_ids: list[int], probe_tokens: list[int], **forward) -> None:
    """Prefill `cache` (a `CompressedCache` or a `SharedPrefill`) with the context, scored by the probe.

    One forward of context + probe; the cache keeps only the context's keep-sets and counts only
    its tokens. The model must run kvc attention (`kvc.apply`). Its positions must hold both: a
    reconstruction probe needs about twice the context's.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    total = len(context_ids) + len(probe_tokens)
    if limit and total > limit:
        raise KvcError(f"the context ({len(context_ids)} tokens) and its probe ({len(probe_tokens)} tokens) need "
                       f"{total} positions, more than the model's {limit}; use a shorter probe")
    inputs = torch.tensor([context_ids + probe_tokens], device=model.device)
    cache.probe_length = len(probe_tokens)
    try:
        model(input_ids=inputs, **{cache_keyword(model): cache}, logits_to_keep=1, **forward)
    finally:
        cache.probe_length = 0
