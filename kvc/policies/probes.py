"""The reconstruction probe, as both the profiler and the runtime read it.

KVzip (arXiv 2505.23416) scores a context without its question by making the model repeat it: a
request, then the context again, whose queries attend to every token they copy. The runtime scores
a context's keys this way when it is compressed before its question (`kvc.runtime.probe`); the
profiler reads the same probe after its prompts to measure how many keys each head holds on to
(`kvc.profiler.context_probe`), from which the compiler sizes the heads' budgets. The names of the
probes a command takes live here too, so that a wrong one is refused before torch is imported.
"""

from kvc.policies.errors import KvcError

RECONSTRUCT_PROMPT = "\n\nRepeat the previous context exactly.\n"
# What scores a context before its question in `kvc eval` (the best on the tuning samples): the
# reconstruction and expected attention together (`kvc.runtime.probe`).
DEFAULT_PROBE = "reconstruct+expected"
POOL_KERNEL = 7  # a key's score is the largest within this many keys around it (SnapKV's pooling)
PROBES = ("window", "generic", "reconstruct", "expected", DEFAULT_PROBE)  # what can score a context (`kvc.runtime.probe`)


def check_probe(probe: str, option: str = "--context-probe") -> str:
    """The probe's name, or one line refusing it."""
    if probe not in PROBES:
        raise KvcError(f"{option}: unknown probe {probe!r} (expected one of {', '.join(PROBES)})")
    return probe
