"""Typed, bounded values out of nested mappings, with the path of the field in every error.

Policies and plan headers are read through `FieldReader`: an integer is an int within its
bounds, a number is finite and within its range, a string is a string, and whatever is wrong is
one `KvcError` naming the field, e.g. `layers[3].heads[1].recovery: 1.5 is outside [0.0, 1.0]`.
"""

from __future__ import annotations

import math

from kvc.policies.errors import KvcError
from kvc.policies.structured import shown

REQUIRED = object()


class FieldReader:
    """Reads typed values out of one mapping; `path` is where that mapping sits in the file."""

    def __init__(self, data, path: str, what: str = "policy"):
        if not isinstance(data, dict):
            raise KvcError(f"{path or what}: expected a mapping, got {type(data).__name__}")
        self.data = data
        self.path = path
        self.what = what

    def where(self, key) -> str:
        name = key if isinstance(key, str) and key.isprintable() and len(key) <= 64 else shown(key)
        return f"{self.path}.{name}" if self.path else name

    def get(self, key, default=REQUIRED):
        if key in self.data:
            return self.data[key]
        if default is REQUIRED:
            raise KvcError(f"{self.where(key)}: missing required key")
        return default

    def integer(self, key, default=None, minimum=0, maximum=None) -> int:
        value = self.get(key, REQUIRED if default is None else default)
        return check_integer(value, self.where(key), minimum, maximum)

    def number(self, key, default=None, low=None, high=None) -> float:
        value = self.get(key, REQUIRED if default is None else default)
        return check_number(value, self.where(key), low, high)

    def string(self, key, default=None) -> str:
        value = self.get(key, REQUIRED if default is None else default)
        if not isinstance(value, str):
            raise KvcError(f"{self.where(key)}: expected a string, got {shown(value)}")
        return value

    def sequence(self, key, default=None) -> list:
        value = self.get(key, REQUIRED if default is None else default)
        if not isinstance(value, list):
            raise KvcError(f"{self.where(key)}: expected a list, got {type(value).__name__}")
        return value

    def mapping(self, key, default=None) -> FieldReader:
        value = self.get(key, REQUIRED if default is None else default)
        return FieldReader(value, self.where(key), self.what)

    def optional(self, key):
        return self.data.get(key)

    def optional_number(self, key, low=None, high=None) -> float | None:
        value = self.data.get(key)
        return None if value is None else check_number(value, self.where(key), low, high)


def check_integer(value, where: str, minimum=0, maximum=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvcError(f"{where}: expected an integer, got {shown(value)}")
    if value < minimum:
        raise KvcError(f"{where}: must be at least {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise KvcError(f"{where}: must be at most {maximum}, got {shown(value)}")
    return value


def check_number(value, where: str, low=None, high=None) -> float:
    """A finite int or float within [low, high] (either bound may be None), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KvcError(f"{where}: expected a number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise KvcError(f"{where}: expected a finite number, got {shown(value)}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise KvcError(f"{where}: {number:g} is outside [{low}, {high}]")
    return number
