"""Reading artifacts within bounds: a crafted file gets one clear refusal, never a hang or a traceback.

A path must name a regular file of at most MAX_FILE_BYTES. YAML is scanned as a stream of events
before anything is built from it: anchors and aliases (which let a few bytes expand into
gigabytes), tags beyond YAML's plain types (`!!python/...`) and nesting deeper than MAX_NESTING
are refused there. JSON is held to the same nesting, and numbers too long to read are refused.
"""

from __future__ import annotations

import json
import reprlib
import stat
from pathlib import Path

import yaml

from kvc.policies.errors import KvcError
from kvc.policies.limits import MAX_FILE_BYTES, MAX_NESTING

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CORE = "tag:yaml.org,2002:"
PLAIN_TAGS = {_CORE + name for name in ("str", "int", "float", "bool", "null", "map", "seq")} | {"!"}
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 40
_SHOWN.maxlist = _SHOWN.maxdict = 4


def shown(value) -> str:
    """A short repr for error messages, whatever the value (a huge list, a 4000-digit number)."""
    try:
        return _SHOWN.repr(value)
    except ValueError:  # an int too long for str()
        return "a number of thousands of digits"


def input_file(path, what: str, max_bytes: int = MAX_FILE_BYTES) -> Path:
    """`path` if it is a regular file of at most `max_bytes`; else one error saying what it is."""
    _checked_size(Path(path), what, max_bytes)
    return Path(path)


def read_input(path, what: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path`, checked by `input_file`, with read errors as one line."""
    path = Path(path)
    size = _checked_size(path, what, max_bytes)
    try:
        with open(path, "rb") as handle:
            data = handle.read(size + 1)  # read(n) allocates n bytes first: ask for what the file holds
    except OSError as error:
        raise KvcError(f"{path}: cannot read the {what} ({error.strerror or error})") from None
    if len(data) > size:
        raise KvcError(f"{path}: the {what} grew while being read; read it again once it is written")
    return data


def _checked_size(path: Path, what: str, max_bytes: int) -> int:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KvcError(f"{path}: no such {what}") from None
    except NotADirectoryError:
        raise KvcError(f"{path}: no such {what} (a folder in the path is a file)") from None
    except OSError as error:
        raise KvcError(f"{path}: cannot read the {what} ({error.strerror or error})") from None
    if stat.S_ISDIR(info.st_mode):
        raise KvcError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise KvcError(f"{path}: not a regular file (a device, pipe or socket); expected a {what}")
    if info.st_size > max_bytes:
        raise KvcError(f"{path}: {info.st_size / 2**20:.1f} MiB is larger than any {what} kvc reads "
                       f"(at most {max_bytes / 2**20:.0f} MiB)")
    return info.st_size


def parse_json(text: str):
    """Plain data from JSON text; KvcError (without the file name) for anything else."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        truncated = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated")
        hint = "; is the file truncated?" if truncated else ""
        raise KvcError(f"not valid JSON (line {error.lineno}: {error.msg}){hint}") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as error:  # an integer beyond Python's str->int digit limit
        raise _unreadable_value(error) from None
    check_nesting(data)
    return data


def parse_yaml(text: str):
    """Plain data from YAML text (JSON included); KvcError (without the file name) for anything else."""
    try:
        _scan_events(text)
        return yaml.load(text, Loader=YAML_LOADER)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        if "nesting depth" in str(error.problem):  # libyaml's own bound (1000), met while reading ahead
            raise _too_deep(mark.line + 1 if mark else None) from None
        where = f"line {mark.line + 1}: " if mark else ""
        truncated = mark is not None and mark.index >= len(text.rstrip())
        hint = "; is the file truncated?" if truncated else ""
        raise KvcError(f"not valid YAML ({where}{error.problem or error.context}){hint}") from None
    except yaml.reader.ReaderError as error:  # a character YAML does not allow, before any token
        line = text.count("\n", 0, error.position) + 1
        character = chr(error.character) if isinstance(error.character, int) else error.character
        raise KvcError(f"not valid YAML (line {line}: the control character {character!r} "
                       "is not allowed); is it a text file?") from None
    except yaml.YAMLError as error:
        raise KvcError(f"not valid YAML ({' '.join(str(error).split())})") from None
    except ValueError as error:  # a scalar its resolver matched but cannot build: 13th month, 5000 digits
        raise _unreadable_value(error) from None


def _scan_events(text: str) -> None:
    """Refuse anchors, aliases, non-plain tags and deep nesting before any node is built."""
    depth = 0
    for event in yaml.parse(text, Loader=YAML_LOADER):
        line = event.start_mark.line + 1 if event.start_mark else "?"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise KvcError(f"line {line}: YAML anchors and aliases (&name, *name) are not allowed in kvc artifacts; "
                           "write the values out")
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in PLAIN_TAGS:
            raise KvcError(f"line {line}: the YAML tag {tag.replace(_CORE, '!!')} is not allowed; kvc artifacts "
                           "hold plain data only (mappings, lists, strings, numbers)")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise _too_deep(line)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def check_nesting(data) -> None:
    """Refuse lists and mappings nested deeper than MAX_NESTING (walked without recursion)."""
    level = [data]
    for _ in range(MAX_NESTING):
        level = [child for item in level if isinstance(item, (list, dict))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return
    raise _too_deep()


def _too_deep(line=None) -> KvcError:
    where = f"line {line}: " if line is not None else ""
    return KvcError(f"{where}lists and mappings nested more than {MAX_NESTING} levels deep; "
                    "no kvc artifact is (is this the right file?)")


def _unreadable_value(error: ValueError) -> KvcError:
    if "digits" in str(error):
        return KvcError("a number has more than 4300 digits; no kvc artifact holds one")
    return KvcError(f"a value cannot be read ({error})")
