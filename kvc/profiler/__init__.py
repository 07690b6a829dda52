"""kvc.profiler: model ─► policy. Run prompts through a model, measure what each attention head
recovers under every head kind and budget, and record it as a policy artifact. Its names load on
first use, so the prompt reader and the settings check import without torch."""

from kvc.lazy import lazy_names

__getattr__ = lazy_names(__name__, {
    "Ratios": "kvc.profiler.measures", "DEFAULT_MAX_TOKENS": "kvc.profiler.profile",
    "ProfileSummary": "kvc.profiler.profile", "profile_model": "kvc.profiler.profile",
    "summarise": "kvc.profiler.profile", "Prompt": "kvc.profiler.prompts", "PromptSet": "kvc.profiler.prompts",
    "load_prompts": "kvc.profiler.prompts"})

__all__ = ["DEFAULT_MAX_TOKENS", "ProfileSummary", "Prompt", "PromptSet", "Ratios", "load_prompts", "profile_model", "summarise"]
