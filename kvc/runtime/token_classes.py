"""Token classes at run time: the ids of the special and the punctuation tokens, looked up by membership.

A plan stores a vocabulary-sized bitmap (a byte per token); the runtime keeps only the int32 ids of
the tokens that have a class (about a thousand on SmolLM2's 49,152) and finds a chunk's classes
with `isin`, which has fixed shapes and compiles.
"""

from __future__ import annotations

import torch

from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT


class TokenClasses:
    """Class bits of token ids, from a plan's (vocab,) uint8 bitmap."""

    def __init__(self, token_classes: torch.Tensor, device="cpu"):
        self.special, self.punctuation = (
            ((token_classes & bit) != 0).nonzero()[:, 0].to(device=device, dtype=torch.int32)
            for bit in (SPECIAL_BIT, PUNCT_BIT))

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids (...) -> (...) uint8 class bits."""
        if self.special.device != token_ids.device:
            self.special, self.punctuation = self.special.to(token_ids.device), self.punctuation.to(token_ids.device)
        ids = token_ids.to(torch.int32)
        bits = torch.isin(ids, self.special).to(torch.uint8) * SPECIAL_BIT
        return bits + torch.isin(ids, self.punctuation).to(torch.uint8) * PUNCT_BIT

    def tensors(self) -> list[torch.Tensor]:
        return [self.special, self.punctuation]
