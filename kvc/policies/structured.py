"""Reading artifacts within bounds: a crafted file gets one clear refusal, never a hang or a traceback.

A path must name a regular file of at most MAX_FILE_BYTES. YAML is built from its stream of
events in one pass that refuses as it reads: anchors and aliases (which let a few bytes expand
into gigabytes), tags beyond YAML's plain types (`!!python/...`), a second document and nesting
deeper than MAX_NESTING; it resolves scalars as PyYAML's safe loader does, in a third of its time.
JSON is held to the same nesting, and numbers too long to read are refused.
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
        return _build(text)
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


class _Open:
    """A list or mapping being built; a mapping holds its key until the value arrives."""

    __slots__ = ("container", "key")

    def __init__(self, container):
        self.container, self.key = container, _NO_KEY


_NO_KEY = object()
_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_COLLECTION_TAGS = {yaml.MappingStartEvent: (_CORE + "map", dict), yaml.SequenceStartEvent: (_CORE + "seq", list)}


def _build(text: str):
    """Plain data from the YAML event stream, built in one pass that refuses as it reads: anchors
    and aliases, tags beyond PLAIN_TAGS, more than one document, nesting past MAX_NESTING. Scalars
    resolve as PyYAML's safe loader resolves them (YAML 1.1: ints, floats, bools, nulls, dates)."""
    stack: list[_Open] = []
    root, documents, plain = None, 0, {}
    for event in yaml.parse(text, Loader=YAML_LOADER):
        kind = type(event)
        if kind is yaml.DocumentStartEvent:
            documents += 1
            if documents > 1:
                raise KvcError(f"line {event.start_mark.line + 1}: a second YAML document (---); "
                               "a kvc artifact is one")
            continue
        if not isinstance(event, yaml.NodeEvent) and kind not in (yaml.MappingEndEvent, yaml.SequenceEndEvent):
            continue
        if kind is yaml.ScalarEvent:
            _check_node(event)
            value = _scalar(event, plain)
        elif kind in _COLLECTION_TAGS:
            _check_node(event)
            tag, container = _COLLECTION_TAGS[kind]
            if event.tag not in (None, "!", tag):
                raise KvcError(f"line {event.start_mark.line + 1}: the YAML tag {event.tag.replace(_CORE, '!!')} "
                               f"does not fit a {container.__name__}")
            if len(stack) >= MAX_NESTING:
                raise _too_deep(event.start_mark.line + 1)
            stack.append(_Open(container()))
            continue
        elif kind is yaml.AliasEvent:
            _check_node(event)
        else:
            value = stack.pop().container
        if not stack:
            root = value
        elif isinstance(stack[-1].container, list):
            stack[-1].container.append(value)
        elif stack[-1].key is _NO_KEY:
            if isinstance(value, (list, dict)):
                raise KvcError(f"line {event.start_mark.line + 1}: a mapping key that is a list or a mapping")
            stack[-1].key = value
        else:
            stack[-1].container[stack[-1].key] = value
            stack[-1].key = _NO_KEY
    return root


def _check_node(event) -> None:
    line = event.start_mark.line + 1
    if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
        raise KvcError(f"line {line}: YAML anchors and aliases (&name, *name) are not allowed in kvc artifacts; "
                       "write the values out")
    if event.tag is not None and event.tag not in PLAIN_TAGS:
        raise KvcError(f"line {line}: the YAML tag {event.tag.replace(_CORE, '!!')} is not allowed; kvc artifacts "
                       "hold plain data only (mappings, lists, strings, numbers)")


def _scalar(event, plain: dict):
    """A scalar's value; plain (unquoted, untagged) ones are remembered, as policies repeat them."""
    value = event.value
    is_plain = event.tag is None and event.implicit[0]
    if is_plain and value in plain:
        return plain[value]
    tag = event.tag if event.tag not in (None, "!") else _RESOLVER.resolve(yaml.ScalarNode, value, event.implicit)
    construct = _CONSTRUCTOR.yaml_constructors.get(tag)
    if construct is None:  # '<<' (a merge key) or '=' resolve to tags that build nothing plain
        raise KvcError(f"line {event.start_mark.line + 1}: {shown(value)} is a YAML {tag.replace(_CORE, '!!')} "
                       "key, which kvc artifacts do not use")
    try:
        result = construct(_CONSTRUCTOR, yaml.ScalarNode(tag, value))
    except (KeyError, TypeError, IndexError, yaml.YAMLError):  # e.g. `!!bool maybe`
        raise KvcError(f"line {event.start_mark.line + 1}: {shown(value)} is not a YAML "
                       f"{tag.replace(_CORE, '!!')}") from None
    if is_plain and len(plain) < 65536:
        plain[value] = result
    return result


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
