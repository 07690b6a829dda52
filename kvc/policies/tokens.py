"""Token classes from a tokenizer: special tokens and punctuation tokens.

Special: the tokenizer's special and added tokens (BOS/EOS, chat-template markers such as
'<|im_start|>'). Punctuation: tokens whose text is made only of punctuation and whitespace
('.', ',', ':', '?', newlines ...). Both are id lists; `class_table` packs them into the
vocabulary-sized bitmap a plan carries.
"""

from __future__ import annotations

import unicodedata

import torch

SPECIAL_BIT = 1
PUNCT_BIT = 2


def special_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens and added (control) tokens, sorted."""
    ids = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special:
            ids.add(int(token_id))
    return sorted(i for i in ids if i is not None and i >= 0)


def is_punctuation_text(text: str) -> bool:
    """True for non-empty text made only of Unicode punctuation and whitespace."""
    return bool(text) and all(ch.isspace() or unicodedata.category(ch).startswith("P") for ch in text)


def punctuation_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens whose decoded text is only punctuation and whitespace, sorted."""
    special = set(special_token_ids(tokenizer))
    vocab_ids = sorted(set(tokenizer.get_vocab().values()) - special)
    texts = tokenizer.batch_decode([[i] for i in vocab_ids], clean_up_tokenization_spaces=False)
    return [i for i, text in zip(vocab_ids, texts) if is_punctuation_text(text)]


def class_table(vocab_size: int, special: list[int], punctuation: list[int]) -> torch.Tensor:
    """A (vocab_size,) uint8 bitmap: SPECIAL_BIT and PUNCT_BIT per token id."""
    table = torch.zeros(vocab_size, dtype=torch.uint8)
    if special:
        table[torch.tensor(special, dtype=torch.long)] |= SPECIAL_BIT
    if punctuation:
        table[torch.tensor(punctuation, dtype=torch.long)] |= PUNCT_BIT
    return table
