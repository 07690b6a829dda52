"""The user's text as commands take it: one prompt from a string or a file, a conversation's turns.

Plain Python (no torch, no transformers): the CLI reads and checks the prompt before it loads a model.
"""

from __future__ import annotations

from pathlib import Path

from kvc.policies.errors import KvcError

TURN_SEPARATOR = "---"  # a line of its own between the user turns of a conversation file


def read_prompt(prompt: str | None, prompt_file=None) -> str:
    """The prompt text from exactly one of a string and a file."""
    if (prompt is None) == (prompt_file is None):
        raise KvcError("give the prompt with exactly one of --prompt TEXT and --prompt-file FILE")
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise KvcError(f"{prompt_file}: cannot read the prompt file ({reason})") from None
    if not prompt.strip():
        raise KvcError("the prompt is empty")
    return prompt


def split_turns(text: str) -> list[str]:
    """User turns of a conversation file: blocks separated by a line that is only `---`."""
    turns, block = [], []
    for line in text.splitlines():
        if line.strip() == TURN_SEPARATOR:
            turns.append("\n".join(block).strip())
            block = []
        else:
            block.append(line)
    turns.append("\n".join(block).strip())
    turns = [turn for turn in turns if turn]
    if not turns:
        raise KvcError("the conversation has no user turn")
    return turns
