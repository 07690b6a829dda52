"""`kvc.generate` refuses what it cannot continue with a KvcError, as the CLI does, before touching the model."""

import pytest

from kvc.policies.errors import KvcError
from kvc.runtime.generate import generate


@pytest.mark.parametrize("prompts, kwargs, message", [
    ("", {}, "non-empty string"),
    ("   \n", {}, "non-empty string"),
    ([], {}, "at least one prompt"),
    (["fine", ""], {}, "non-empty string"),
    (["fine", None], {}, "non-empty string"),
    ("fine", {"max_new_tokens": 0}, "max_new_tokens is 0"),
    ("fine", {"compile": True}, "compile runs a plan's compressed step; give a plan"),
])
def test_bad_arguments_raise_kvc_error(smollm, prompts, kwargs, message):
    with pytest.raises(KvcError, match=message):
        generate(smollm, prompts, **kwargs)
