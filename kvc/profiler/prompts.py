"""Profiling prompts: the built-in set shipped with kvc, or the user's JSONL, text files or folder.

A prompt is plain text or a chat (`messages`), rendered with the model's chat template. The
built-in set (prompts/builtin.jsonl, written for kvc) covers chat instructions, long documents
with questions, code, lists and tables, and multi-turn dialogue, from about 400 to 2,600 tokens;
it shares nothing with the evaluation texts (Paul Graham essays, numeric passkeys).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvc.policies.errors import KvcError
from kvc.policies.structured import parse_json

BUILTIN = "builtin"
PROMPT_SUFFIXES = (".jsonl", ".txt")


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs

    def canonical(self) -> dict:
        if self.messages is not None:
            return {"name": self.name, "messages": [list(m) for m in self.messages]}
        return {"name": self.name, "text": self.text}


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[Prompt, ...]

    @property
    def digest(self) -> str:
        """sha256 of the prompts' canonical JSON (16 hex digits)."""
        body = json.dumps([p.canonical() for p in self.prompts], sort_keys=True, ensure_ascii=False)
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()[:16]


def load_prompts(spec: str = BUILTIN) -> PromptSet:
    """'builtin', a .jsonl file ({"text": ...} or {"messages": [...]} per line), a .txt file
    (one prompt) or a folder of such files."""
    if spec == BUILTIN:
        source = resources.files("kvc.profiler").joinpath("prompts", "builtin.jsonl")
        return PromptSet(BUILTIN, tuple(_parse_jsonl(source.read_text(encoding="utf-8"), "builtin")))
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES)
        if not files:
            raise KvcError(f"{path}: the folder holds no .jsonl or .txt prompt files")
        return PromptSet(path.name, tuple(prompt for file in files for prompt in _read_file(file)))
    if not path.exists():
        raise KvcError(f"{spec}: no such prompt file or folder (or pass --prompts builtin)")
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise KvcError(f"{path}: expected a .jsonl or .txt prompt file, or a folder of them")
    return PromptSet(path.name, tuple(_read_file(path)))


def _read_file(path: Path) -> list[Prompt]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise KvcError(f"{path}: cannot read the prompt file ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KvcError(f"{path}: not a UTF-8 text file") from None
    if "\x00" in text:
        raise KvcError(f"{path}: not a text file (binary data)")
    if not text.strip():
        raise KvcError(f"{path}: the prompt file is empty")
    if path.suffix.lower() == ".txt":
        return [Prompt(name=path.stem, text=text)]
    return _parse_jsonl(text, str(path), path.stem)


def _parse_jsonl(text: str, where: str, stem: str = BUILTIN) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = parse_json(line)  # bounded: a line nested 100k deep is one error, not a RecursionError
        except KvcError as error:
            reason = "not valid JSON" if str(error).startswith("not valid JSON") else str(error)
            raise KvcError(f"{where} line {number}: {reason}") from None
        prompts.append(_parse_record(record, f"{where} line {number}", f"{stem}:{number}"))
    if not prompts:
        raise KvcError(f"{where}: the prompt file holds no prompts")
    return prompts


def _parse_record(record, where: str, default_name: str) -> Prompt:
    if not isinstance(record, dict) or ("text" in record) == ("messages" in record):
        raise KvcError(f'{where}: expected an object with "text" or "messages" (exactly one)')
    name = record.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise KvcError(f'{where}: "name" must be a non-empty string')
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise KvcError(f'{where}: "text" must be a non-empty string')
        return Prompt(name=name, text=record["text"])
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise KvcError(f'{where}: "messages" must be a non-empty list')
    pairs = []
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise KvcError(f'{where}: messages[{i}] must be {{"role": str, "content": str}}')
        pairs.append((message["role"], message["content"]))
    return Prompt(name=name, messages=tuple(pairs))


def prompt_token_ids(prompt: Prompt, tokenizer) -> list[int]:
    """Token ids of a prompt: text as the tokenizer encodes it (with its BOS, if any); a chat
    through the model's chat template, or as 'Role: content' paragraphs when it has none."""
    if prompt.messages is None:
        return list(tokenizer(prompt.text)["input_ids"])
    messages = [{"role": role, "content": content} for role, content in prompt.messages]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    plain = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return list(tokenizer(plain)["input_ids"])
