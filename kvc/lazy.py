"""Package names that load on first use (PEP 562), so importing a package costs nothing until a
name is used: the compiler and policies import torch, the runtime transformers and triton
(seconds each), and `kvc --help` or a refused command needs none of them."""

from __future__ import annotations

import importlib


def lazy_names(package: str, names: dict[str, str]):
    """A module `__getattr__` for `package` that imports `names[name]`'s module when `name` is first read."""

    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
