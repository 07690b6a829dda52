"""With the question in the prompt, kvc's SnapKV-style heads scored by expected attention too: a measurement.

kvc's plans pick a prompt's heavy hitters by the attention of its last 32 queries (SnapKV's
observation window), the question's among them. Query-agnostic they score by the reconstruction
probe plus expected attention (`kvc.runtime.expected_attention`: the attention the queries still
to come are expected to give each key, from the prompt's own last 128 queries). This is `kvc eval`
with two more methods, the default kvc plan scored otherwise with the question in the prompt:

    kvc-we   the window's attention plus expected attention, each a share of its head's total
             (`kvc.runtime.probe.combined_scores`, as reconstruct+expected adds its two)
    kvc-e    expected attention alone
    kvc-acc  the attention of every prompt query summed (H2O's score), kvc's pooling

Every other method, and every method query-agnostic, is scored as `kvc eval` scores it:

    OMP_NUM_THREADS=1 python benchmarks/aware_scoring.py --policy POLICY --tasks fidelity \\
        --methods full,kvc,kvc-we,kvc-e,h2o --budgets 0.1 --lengths 1024 --samples 10 --first-sample 15 \\
        --setting query-aware --json benchmarks/results/eval_fidelity_aware_scoring_10_1024_15.json
"""

from __future__ import annotations

import sys

from kvc.eval import baselines
from kvc.models import LoadedModel
from kvc.runtime import cache
from kvc.runtime.expected_attention import expected_attention, rotary_frequencies
from kvc.runtime.kernels import observation_scores, pool_scores
from kvc.runtime.probe import combined_scores

NOTE = "aware_scoring"  # the plan's notes key naming how its prompt is scored
SCORINGS = {"kvc-we": "window+expected", "kvc-e": "expected", "kvc-acc": "accumulated"}


def scored_as(scoring: str):
    """kvc's default plan, marked to score its prompt by `scoring`."""
    build = baselines.METHODS["kvc"].build

    def plan(*args):
        marked = build(*args)
        marked.notes[NOTE] = scoring
        return marked
    return plan


def prompt_scores(layer, query, keys, values, scale, scoring: str):
    """(batch, kv_heads, length) pooled scores of a prompt's keys, as the store takes them."""
    plan, observed = layer.store.plan, layer.cache.observed
    if scoring == "accumulated":
        return observation_scores(query, keys, observed.start, scale, plan.pool_kernel)
    expected = expected_attention(query, keys, values, observed.start, scale, layer.cache.frequencies)
    window = None
    if scoring == "window+expected":
        last = query[:, :, -min(plan.observation_window, query.shape[2]):]
        window = observation_scores(last, keys, observed.start, scale, 1)  # unpooled: pooled once, after the sum
    return pool_scores(combined_scores(window, expected), observed.start, plan.pool_kernel)


def install() -> None:
    """Add kvc-we and kvc-e to `kvc eval`'s methods and score their prompts as marked."""
    for method, scoring in SCORINGS.items():
        baselines.METHODS[method] = baselines.Baseline(scored_as(scoring), True,
                                                       f"kvc, its prompt scored by {scoring}")
    plain_init, plain_compress = cache.CompressedCache.__init__, cache.CompressedLayer.compress

    def init(self, plan, model, *args, **kwargs):
        plain_init(self, plan, model, *args, **kwargs)
        self.frequencies = rotary_frequencies(model.model if isinstance(model, LoadedModel) else model)

    def compress(self, query, keys, values, scale):
        scoring = self.store.plan.notes.get(NOTE)
        if scoring is None or not self.store.layout.has_frequency:
            return plain_compress(self, query, keys, values, scale)
        observed = self.cache.observed
        self.store.prefill(keys, values, observed.classes, observed.start, None, scale,
                           scores=prompt_scores(self, query, keys, values, scale, scoring))

    cache.CompressedCache.__init__, cache.CompressedLayer.compress = init, compress


def main() -> None:
    from kvc.cli import main as kvc_main

    install()
    sys.argv = ["kvc", "eval", *sys.argv[1:]]
    kvc_main()


if __name__ == "__main__":
    main()
