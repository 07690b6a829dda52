"""Memory sizes and dtypes as users write them."""

import pytest

from kvc.compiler.sizes import format_size, parse_dtype, parse_size
from kvc.policies.errors import KvcError


@pytest.mark.parametrize("text, size", [
    ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("1000000", 1_000_000),
    ("2 gib", 2 * 2**30), ("64KB", 64_000), ("3B", 3), (" 1TiB ", 2**40), (4096, 4096), ("1e6", 1_000_000),
])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2XB", "GiB", "", "two GiB", "2GiB3", "1..5GB", True, "nan"])
def test_junk_sizes_say_what_is_accepted(text):
    with pytest.raises(KvcError, match="not a size|expected a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["-1GiB", "0", "0.4", 0, -5])
def test_sizes_must_be_positive(text):
    with pytest.raises(KvcError, match="must be positive"):
        parse_size(text)


def test_dtypes():
    assert [parse_dtype(d) for d in ("bf16", "FP16", "fp32", "bfloat16")] == ["bfloat16", "float16", "float32", "bfloat16"]
    with pytest.raises(KvcError, match="expected bf16, fp16 or fp32"):
        parse_dtype("int8")


def test_format_size():
    assert format_size(100) == "100 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(3 * 2**40) == "3.00 TiB"
