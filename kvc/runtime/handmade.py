"""Hand-made plans: each KV head given a kind and fixed budgets directly, without profiling.

For tests, benchmarks and quick experiments (a StreamingLLM-like 'special+local' everywhere, or
a keep-everything 'full' plan); real plans come from `kvc compile`, which chooses kinds and
budgets per head from a policy.
"""

from __future__ import annotations

import torch

from kvc.models import architecture, fingerprint
from kvc.plan import Plan, Target
from kvc.policies.kinds import kind_code, kind_components
from kvc.policies.tokens import class_table, punctuation_token_ids, special_token_ids


def head_tables(kinds, max_len: int, sinks: int = 4, class_slots: int = 0, heavy: int = 0,
                window: int = 0) -> dict[str, torch.Tensor]:
    """The plan's (layers, kv_heads) int32 head tables for a nested list of kinds and uniform budgets."""
    def table(budget_of):
        return torch.tensor([[budget_of(kind_components(kind)) for kind in row] for row in kinds], dtype=torch.int32)

    return {
        "kind_codes": torch.tensor([[kind_code(kind) for kind in row] for row in kinds], dtype=torch.int32),
        "sinks": table(lambda parts: sinks if "special" in parts else 0),
        "class_slots": table(lambda parts: class_slots if {"special", "punct"} & set(parts) else 0),
        "heavy": table(lambda parts: heavy if "frequency" in parts else 0),
        "window": table(lambda parts: window if "local" in parts else 0),
        "full_slots": table(lambda parts: max_len if "full" in parts else 0),
    }


def model_token_classes(config, tokenizer) -> torch.Tensor:
    """The (vocab,) class bitmap of a model's tokenizer: its special and punctuation tokens."""
    vocab = architecture(config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    special, punctuation = special_token_ids(tokenizer), punctuation_token_ids(tokenizer)
    return class_table(vocab, [i for i in special if i < vocab], [i for i in punctuation if i < vocab])


def handmade_plan(
    config,
    tokenizer,
    kinds,
    max_len: int,
    *,
    sinks: int = 4,
    class_slots: int = 0,
    heavy: int = 0,
    window: int = 0,
    batch: int = 1,
    dtype: str = "float32",
    kv_bits: int = 0,
) -> Plan:
    """A plan giving every head of `kinds` the budgets of its components.

    kinds: one kind for every head, or a (layers x kv_heads) nested list of kinds. Sinks go with
    'special', class slots with 'special' or 'punct', heavy with 'frequency', window with 'local';
    a 'full' head gets max_len slots.
    """
    arch = architecture(config.get_text_config() if hasattr(config, "get_text_config") else config)
    if isinstance(kinds, str):
        kinds = [[kinds] * arch.num_kv_heads for _ in range(arch.num_layers)]
    token_classes = model_token_classes(config, tokenizer)
    return Plan(
        model_name=getattr(config, "name_or_path", "") or arch.architecture,
        fingerprint=fingerprint(config, tokenizer),
        num_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
        target=Target(max_len=max_len, batch=batch, dtype=dtype),
        token_classes=token_classes,
        expected_recovery=torch.ones(arch.num_layers, arch.num_kv_heads),
        strategy="handmade",
        kv_bits=kv_bits,
        **head_tables(kinds, max_len, sinks, class_slots, heavy, window),
    )
