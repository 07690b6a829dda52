"""kvc.profiler: model ─► policy. Run prompts through a model, measure what each attention head
recovers under every head kind and budget, and record it as a policy artifact."""

from kvc.profiler.measures import Ratios
from kvc.profiler.profile import (
    DEFAULT_MAX_TOKENS,
    ProfileSummary,
    profile_model,
    summarise,
)
from kvc.profiler.prompts import Prompt, PromptSet, load_prompts

__all__ = ["DEFAULT_MAX_TOKENS", "ProfileSummary", "Prompt", "PromptSet", "Ratios", "load_prompts", "profile_model", "summarise"]
