"""A question answered through a plan's exported graphs, in either setting, as the evaluation asks it.

Query-aware: the context and the question go through the prefill graph together. Query-agnostic:
the context alone, then the question through the step graph one token at a time (an export's step
takes one token; kvc's torch runtime takes the question as one chunk, whose queries also see the
window tokens the chunk itself evicts, so the two may differ slightly). Then greedy decoding.
"""

from __future__ import annotations

import numpy as np

from kvc.eval.questions import QUERY_AWARE, Answer, Prompt
from kvc.export.onnx import OnnxGenerator


def answer_exported(generator: OnnxGenerator, prompt: Prompt, setting: str, new_tokens: int) -> Answer:
    """The plan's greedy answer (at most `new_tokens`, up to an end-of-sequence token) in `setting`."""
    asked = prompt.context_ids + (prompt.question_ids if setting == QUERY_AWARE else [])
    generator.check_length(max(len(asked), generator.manifest["shortest_prompt"]) + len(prompt.question_ids)
                           * (setting != QUERY_AWARE) + new_tokens - 1)
    logits, state = generator.prefill([asked])
    if setting != QUERY_AWARE:
        for token in prompt.question_ids:
            logits, state = _next(generator, token, state)
    tokens, eos = [], generator.manifest["eos_token_id"]
    while True:
        token = int(np.argmax(logits[0]))
        tokens.append(token)
        if token == eos or len(tokens) == new_tokens:
            return Answer(tokens, generator.state_bytes(state) + generator.manifest["plan"]["table_bytes"])
        logits, state = _next(generator, token, state)


def _next(generator: OnnxGenerator, token: int, state):
    logits, state = generator.step(np.array([[token]], dtype=np.int64), state)
    return logits[:, -1], state
