"""A chat of several turns through one cache on the embedded model: the second turn extends the cache
(one chunk, no second prefill) and replies exactly as a fresh full cache given the whole conversation
does; a compressed plan keeps its bytes across turns; the CLI runs a conversation file and an
interactive session."""

import io

import pytest
import torch
from transformers import DynamicCache

from kvc.cli import main
from kvc.policies.errors import KvcError
from kvc.runtime.apply import cache_keyword
from kvc.runtime.conversation import Conversation
from kvc.runtime.prompts import split_turns
from kvc.runtime.handmade import handmade_plan

TURNS = ["Name one colour of the French flag.", "Now name a fruit of that colour."]


def test_a_second_turn_extends_the_cache_and_replies_as_a_fresh_full_cache(smollm):
    plan = handmade_plan(smollm.model.config, smollm.tokenizer, "full", 256)
    with Conversation(smollm, plan) as conversation:
        first = conversation.say(TURNS[0], 10)
        fed_before = conversation.cache.get_seq_length()
        second = conversation.say(TURNS[1], 10)
        history = conversation.history_ids
    assert first.reply and second.reply
    assert second.added_tokens < 30 and fed_before == first.cached_tokens  # the turn's template and text only
    prompt = torch.tensor([history[:len(history) - second.new_tokens]])
    with torch.no_grad():
        fresh = smollm.model.generate(prompt, **{cache_keyword(smollm.model): DynamicCache(config=smollm.model.config)},
                                      max_new_tokens=10, do_sample=False, pad_token_id=smollm.tokenizer.eos_token_id)
    assert smollm.tokenizer.decode(fresh[0, prompt.shape[1]:], skip_special_tokens=True) == second.reply


def test_a_compressed_conversation_keeps_its_bytes(smollm):
    plan = handmade_plan(smollm.model.config, smollm.tokenizer, "special+punct+frequency+local", 256, class_slots=16,
                         heavy=16, window=16)
    with Conversation(smollm, plan) as conversation:
        turns = [conversation.say(text, 8) for text in TURNS]
    assert turns[0].cache_bytes == turns[1].cache_bytes == plan.cache_bytes
    assert turns[1].cached_tokens > turns[0].cached_tokens > 40


def test_a_probed_first_turn_is_not_kept_and_the_conversation_goes_on_from_it(smollm):
    """With a plan that keeps every token, a first turn scored by the reconstruction probe leaves the
    cache as without it: the probe is never stored and the next positions follow the first turn."""
    plan = handmade_plan(smollm.model.config, smollm.tokenizer, "full", 256)
    replies = []
    for probe in ("window", "reconstruct", "expected", "reconstruct+expected"):
        with Conversation(smollm, plan, context_probe=probe) as conversation:
            replies.append([conversation.say(text, 6) for text in TURNS])
    for probed in replies[1:]:
        assert [(turn.reply, turn.cached_tokens) for turn in probed] == [
            (turn.reply, turn.cached_tokens) for turn in replies[0]]
    with pytest.raises(KvcError, match="--context-probe: unknown probe"):
        Conversation(smollm, plan, context_probe="question")


def test_turn_files_and_refusals(smollm):
    assert split_turns("first\nline two\n---\n\nsecond\n---\n") == ["first\nline two", "second"]
    with pytest.raises(KvcError, match="no user turn"):
        split_turns("---\n  \n---")
    with Conversation(smollm) as conversation, pytest.raises(KvcError, match="empty"):
        conversation.say("  ")


def run(capsys, *args):
    with pytest.raises(SystemExit) as done:
        main(list(args))
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_cli_conversation_file_and_interactive(monkeypatch, smollm, capsys, tmp_path):
    monkeypatch.setattr("kvc.models.load", lambda *args, **kwargs: smollm)
    conversation = tmp_path / "chat.txt"
    conversation.write_text(f"{TURNS[0]}\n---\n{TURNS[1]}\n")
    code, out, _ = run(capsys, "generate", "--chat", "--prompt-file", str(conversation), "--max-new-tokens", "6")
    assert code == 0 and out.count("assistant: ") == 2 and "the cache holds" in out
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{TURNS[0]}\n\n"))
    code, out, _ = run(capsys, "generate", "--chat", "--interactive", "--max-new-tokens", "4")
    assert code == 0 and out.count("assistant: ") == 1
    code, _, err = run(capsys, "generate", "--interactive")
    assert code == 2 and "add --chat" in err
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--context-probe", "recon")
    assert code == 2 and "--context-probe: unknown probe 'recon'" in err and err.strip().count("\n") == 0
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--context-probe", "generic")
    assert code == 2 and "give --plan" in err
