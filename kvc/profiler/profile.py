"""Profile a model: run each prompt through it once with the capture attention, sum every layer's
statistics at the prompt's probe queries, and assemble the policy artifact.

Statistics are computed inside each layer's forward on that layer's device (so models spread
over devices with `device_map` work) and only the small per-layer sums are kept. Nothing is
written here: the caller saves the policy atomically, so an interruption leaves no file.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from kvc import __version__
from kvc.models import LoadedModel, architecture, load, resolve_device
from kvc.policies.errors import KvcError
from kvc.policies.kinds import FASTGEN_POLICIES
from kvc.policies.probes import RECONSTRUCT_PROMPT
from kvc.policies.schema import ModelInfo, Policy, ProfileInfo, TokenSets
from kvc.policies.tokens import punctuation_token_ids, special_token_ids
from kvc.profiler.assemble import layer_profile
from kvc.profiler.capture import capturing
from kvc.profiler.context_probe import CONTEXT_PROBE_SCHEME, PROBE_TOKENS, ProbeObserver, probe_sequence
from kvc.profiler.measures import (
    DEFAULT_RATIOS,
    PROBE_SCHEME,
    RETRIEVAL_SCHEME,
    LayerStatistics,
    Ratios,
    copy_events,
    probe_positions,
)
from kvc.profiler.prompts import PromptSet, load_prompts, prompt_token_ids
from kvc.profiler.settings import check_threshold
from kvc.profiler.statistics import measured_attention

DEFAULT_MAX_TOKENS = 4096


def load_model(name: str | None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a model to profile. With --device auto on CUDA it is spread by device_map='auto'
    (accelerate), so a model larger than one GPU fits; the statistics follow each layer's device."""
    resolved = resolve_device(device)
    device_map = "auto" if device == "auto" and resolved.startswith("cuda") else None
    return load(name, dtype=dtype, device=resolved, device_map=device_map)


@dataclass(frozen=True)
class TokenizedPrompt:
    name: str
    token_ids: torch.Tensor  # (n,) long


def tokenize_prompts(prompts: PromptSet, tokenizer, limit: int | None, strict: bool = False, warn=None) -> list[TokenizedPrompt]:
    """Token ids of every prompt, cut to `limit` tokens with a warning (an error when strict)."""
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    result = []
    for prompt in prompts.prompts:
        ids = prompt_token_ids(prompt, tokenizer)
        if not ids:
            raise KvcError(f"prompt {prompt.name!r} has no tokens")
        if limit is not None and len(ids) > limit:
            if strict:
                raise KvcError(f"prompt {prompt.name!r} has {len(ids)} tokens, more than the limit of {limit} (--strict)")
            warn(f"prompt {prompt.name!r} has {len(ids)} tokens; profiling its first {limit}")
            ids = ids[:limit]
        result.append(TokenizedPrompt(prompt.name, torch.tensor(ids, dtype=torch.long)))
    return result


class StatisticsObserver:
    """Computes each layer's attention for the model and adds the layer's statistics to its sums."""

    def __init__(self, num_layers: int, special: list[int], punctuation: list[int], ratios: Ratios,
                 attention=measured_attention, progress=None):
        self.totals: list[LayerStatistics | None] = [None] * num_layers
        self.special = torch.tensor(special, dtype=torch.long)
        self.punctuation = torch.tensor(punctuation, dtype=torch.long)
        self.ratios = ratios
        self.attention = attention
        self.progress = progress

    def start(self, prompt: TokenizedPrompt) -> None:
        self.prompt = prompt
        self.probes = probe_positions(prompt.token_ids)
        self.copies = copy_events(prompt.token_ids)
        self.is_special = torch.isin(prompt.token_ids, self.special)
        self.is_punct = torch.isin(prompt.token_ids, self.punctuation)
        self.layers_seen = 0

    def attend(self, layer, query, key, value, attention_mask, scaling):
        layer = self.layers_seen if layer is None else layer
        self.layers_seen += 1
        assert query.shape[0] == 1 and query.shape[2] == key.shape[2], "one prompt at a time, without a cache"
        output, stats = self.attention(query[0], key[0], value[0], attention_mask, scaling, self.probes,
                                       self.is_special, self.is_punct, self.ratios, self.copies)
        self.totals[layer] = stats if self.totals[layer] is None else self.totals[layer] + stats
        if self.progress is not None:
            self.progress(self.prompt.name)
        return output.unsqueeze(0)


def profile_model(
    loaded: LoadedModel,
    prompts: PromptSet | str = "builtin",
    threshold: float = 0.95,
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    strict: bool = False,
    ratios: Ratios = DEFAULT_RATIOS,
    progress=None,
    warn=None,
    attention=measured_attention,
) -> Policy:
    """Profile `loaded` on `prompts` and return the policy (FastGen choices at `threshold`).

    progress(prompt_name) is called after each layer of each prompt, in the statistics pass and
    in the context probe's (`progress_steps` in all); warn(message) for truncated prompts;
    `attention` may be the exact reference (kvc.profiler.reference)."""
    started = time.perf_counter()
    threshold = check_threshold(threshold)
    prompt_set = load_prompts(prompts) if isinstance(prompts, str) else prompts
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = architecture(model.config)
    tokenized = tokenize_prompts(prompt_set, tokenizer, _token_limit(arch.max_position_embeddings, max_tokens), strict, warn)
    tokens = TokenSets(special=special_token_ids(tokenizer), punctuation=punctuation_token_ids(tokenizer))
    observer = StatisticsObserver(arch.num_layers, tokens.special, tokens.punctuation, ratios, attention, progress)
    device = model.get_input_embeddings().weight.device
    with capturing(model, observer), torch.inference_mode():
        for prompt in tokenized:
            observer.start(prompt)
            model.base_model(input_ids=prompt.token_ids.to(device).unsqueeze(0), use_cache=False)
            if observer.layers_seen != arch.num_layers:
                raise KvcError(
                    f"{loaded.source.name}: {observer.layers_seen} of {arch.num_layers} layers ran their attention "
                    "through transformers' AttentionInterface; the profiler needs all of them"
                )
    probe_curves = context_probe_curves(loaded, tokenized, tokens.special, progress)
    return Policy(
        kvc_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(
            name=loaded.source.name, fingerprint=loaded.fingerprint, num_layers=arch.num_layers,
            num_attention_heads=arch.num_attention_heads, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
            source=f"{loaded.source.kind}:{loaded.source.location}", architecture=arch.architecture,
            max_position_embeddings=arch.max_position_embeddings, vocab_size=arch.vocab_size,
        ),
        profile=ProfileInfo(
            prompt_set=prompt_set.name, prompt_count=len(tokenized), token_counts=[len(p.token_ids) for p in tokenized],
            prompt_hash=prompt_set.digest, threshold=threshold, local_ratio=ratios.local,
            frequency_ratio=ratios.frequency, sinks=ratios.sinks, probe_scheme=PROBE_SCHEME,
            dtype=str(model.dtype).removeprefix("torch."), device=model_devices(model),
            seconds=round(time.perf_counter() - started, 2),
            retrieval_scheme=RETRIEVAL_SCHEME, copy_events=observer.totals[0].copy_events,
            context_probe_scheme=CONTEXT_PROBE_SCHEME,
        ),
        tokens=tokens,
        layers=[layer_profile(i, stats, threshold, curves) for i, (stats, curves) in enumerate(zip(observer.totals, probe_curves))],
    )


def progress_steps(prompt_count: int, num_layers: int) -> int:
    """How often `profile_model` calls `progress`: each layer of each prompt, in both passes."""
    return 2 * prompt_count * num_layers


def context_probe_curves(loaded: LoadedModel, prompts: list[TokenizedPrompt], special: list[int],
                         progress=None) -> list[torch.Tensor]:
    """Per layer (kv_heads, points): each KV head's share of the prompts' keys at each score point
    of the reconstruction probe read after them (`kvc.profiler.context_probe`)."""
    model, arch = loaded.model, architecture(loaded.model.config)
    request = loaded.tokenizer(RECONSTRUCT_PROMPT, add_special_tokens=False).input_ids
    limit = arch.max_position_embeddings or PROBE_TOKENS * 2 + len(request)
    observer = ProbeObserver(arch.num_layers, progress)
    device = model.get_input_embeddings().weight.device
    with capturing(model, observer), torch.inference_mode():
        for prompt in prompts:
            sequence, context = probe_sequence(prompt.token_ids.tolist(), request, set(special), limit)
            observer.start(context, f"{prompt.name} (context probe)")
            model.base_model(input_ids=torch.tensor([sequence], device=device), use_cache=False)
    return observer.curves()


def _token_limit(model_limit: int, max_tokens: int | None) -> int | None:
    if max_tokens is not None and max_tokens < 1:
        raise KvcError(f"--max-tokens {max_tokens}: must be at least 1")
    limits = [limit for limit in (model_limit or None, max_tokens) if limit]
    return min(limits) if limits else None


def model_devices(model) -> str:
    """'cpu', 'cuda:0', or the devices of a model spread by device_map, comma-separated."""
    placed = getattr(model, "hf_device_map", None)
    if placed and len(set(map(str, placed.values()))) > 1:
        return ",".join(sorted({_device_name(d) for d in placed.values()}))
    return str(model.get_input_embeddings().weight.device)


def _device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


# ------------------------------------------------------------------ summary for people

@dataclass(frozen=True)
class ProfileSummary:
    kinds: dict[str, int]  # KV heads per FastGen choice
    mean_recovery: float  # over KV heads
    length: int  # mean profiled prompt length (tokens)
    full_bytes: int  # the full KV cache of one sequence at that length
    kept_bytes: int  # what the FastGen choices keep at that length


def summarise(policy: Policy) -> ProfileSummary:
    """Heads per kind, mean recovery, and the KV memory the FastGen choices keep at the profiled length."""
    profile, model = policy.profile, policy.model
    length = round(sum(profile.token_counts) / max(1, len(profile.token_counts)))
    element = torch.finfo(getattr(torch, profile.dtype)).bits // 8 if profile.dtype else 2
    per_token = 2 * model.head_dim * element  # key and value of one KV head
    heads = [head for layer in policy.layers for head in layer.heads]
    kinds: dict[str, int] = {}
    kept_tokens = 0.0
    for head in heads:
        kinds[head.kind] = kinds.get(head.kind, 0) + 1
        kept_tokens += _kept_tokens(head, length, profile)
    return ProfileSummary(
        kinds=kinds,
        mean_recovery=sum(h.recovery for h in heads) / len(heads),
        length=length,
        full_bytes=round(len(heads) * length * per_token),
        kept_bytes=round(kept_tokens * per_token),
    )


def summary_lines(summary: ProfileSummary) -> list[str]:
    order = {kind: i for i, kind in enumerate(FASTGEN_POLICIES)}
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(summary.kinds.items(), key=lambda item: order[item[0]]))
    saved = 1 - summary.kept_bytes / summary.full_bytes if summary.full_bytes else 0.0
    return [
        f"KV heads per FastGen choice: {kinds}",
        f"mean recovery {summary.mean_recovery:.3f}",
        (f"at the profiled length ({summary.length} tokens) the FastGen choices keep {_mebibytes(summary.kept_bytes)} "
         f"of the full cache's {_mebibytes(summary.full_bytes)} per sequence: {saved:.0%} saved"),
    ]


def _mebibytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def _kept_tokens(head, length: int, profile: ProfileInfo) -> float:
    """Tokens a head of its kind keeps of `length`: its classes' shares plus its budgets, at most all."""
    share = {
        "special": head.special_fraction, "punct": head.punct_fraction,
        "frequency": profile.frequency_ratio, "local": profile.local_ratio, "full": 1.0,
    }
    return min(1.0, sum(share[c] for c in head.components)) * length
