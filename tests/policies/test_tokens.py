"""Token classes on the embedded model's real tokenizer."""

import pytest

from kvc.policies.tokens import PUNCT_BIT, SPECIAL_BIT, class_table, is_punctuation_text, punctuation_token_ids, special_token_ids


@pytest.fixture(scope="module")
def classes(smollm):
    return special_token_ids(smollm.tokenizer), punctuation_token_ids(smollm.tokenizer)


def test_special_tokens_include_chat_markers(smollm, classes):
    special, _ = classes
    tokenizer = smollm.tokenizer
    for marker in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(marker) in special
    assert tokenizer.convert_tokens_to_ids("Paris") not in special


def test_punctuation_tokens_of_a_real_sentence(smollm, classes):
    special, punct = classes
    tokenizer = smollm.tokenizer
    ids = tokenizer("Hello, world. Is it? Yes:\n\nno!", add_special_tokens=False).input_ids
    texts = [tokenizer.decode([i]) for i in ids]
    marked = {text for i, text in zip(ids, texts) if i in set(punct)}
    assert {",", ".", "?", ":", "!"} <= {t.strip() for t in marked}
    assert not any(word in marked for word in ("Hello", " world", " Yes", "no"))
    assert not set(special) & set(punct)


def test_class_table_bits(smollm, classes):
    special, punct = classes
    table = class_table(len(smollm.tokenizer), special, punct)
    assert table.shape == (len(smollm.tokenizer),)
    assert int(table[special[0]]) & SPECIAL_BIT and not int(table[special[0]]) & PUNCT_BIT
    assert int(table[punct[0]]) == PUNCT_BIT
    assert int((table != 0).sum()) == len(special) + len(punct)


@pytest.mark.parametrize("text, expected", [(".", True), (" ,\n", True), ("\n\n", True), ("—", True),
                                            ("a.", False), ("", False), ("42", False), ("+", False)])
def test_is_punctuation_text(text, expected):
    assert is_punctuation_text(text) is expected
