"""YAML files -> plain data plus the positions needed for `file:line:col` errors.

Shared by `testbed.experiment.load` (experiments) and `testbed.experiment.policies` (policy data).
ruamel.yaml's round-trip loader keeps a line/column on every mapping key and
sequence item; pydantic reports errors as a `loc` path. This module joins the
two, so every problem a user can make in a YAML file is reported as
`configs/x.yaml:12:5: axes.policy[2]: <what is wrong and what is allowed>`.

It is also where hostile or broken input stops: only regular files (or `-`) are
read, within a size limit; bytes must be UTF-8 without control characters;
integers, nesting and alias expansion are bounded; tags are refused. So loading
ends in data or a ConfigError within seconds, whatever the file holds.
"""

from __future__ import annotations

import datetime
import difflib
import os
import re
import stat
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.constructor import ConstructorError, RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from testbed.errors import ConfigError


def display_path(path: Path) -> str:
    """The path as a user would type it: relative to the working directory when inside it."""
    if path == STDIN:
        return "<stdin>"
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Source:
    """A loaded YAML file: the round-trip tree (for positions), its path and text."""

    path: Path
    tree: Any
    text: str = ""
    empty: bool = False   # nothing but comments and blank lines

    @property
    def name(self) -> str:
        return display_path(self.path)

    def problem(self, loc: tuple[str | int, ...], message: str, *, key: bool = False) -> Problem:
        line, col = locate(self.tree, loc, key=key)
        return Problem(self.name, line, col, format_loc(loc), message)


@dataclass(frozen=True)
class Problem:
    """One user-facing problem; sorts by position so errors read top to bottom."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


# Bounds that keep loading any file within a few seconds (ruamel's round-trip parser
# takes about 0.1 ms per value here); shipped files are 2-3 KB with about 100 values.
MAX_FILE_BYTES = 128 << 10
MAX_DEPTH = 32                # our schemas nest 5 deep
MAX_VALUES = 20_000           # values after alias expansion (`*name` may repeat a big &anchor)
MAX_NUMBER_DIGITS = 40        # no count, size or seed needs more
MAX_PROBLEM_LINES = 20        # a message stays readable: the rest is counted, not printed
STDIN = Path("-")             # `-c -`: the experiment comes from standard input

# YAML's printable set (YAML 1.2, 5.1); anything else must be written as an escape.
_NOT_PRINTABLE = re.compile("[^\x09\x0A\x0D\x20-\x7E\x85\xA0-\uD7FF\uE000-\uFFFD"
                            "\U00010000-\U0010FFFF]")
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def raise_problems(problems: list[Problem], hint: str | None = None) -> None:
    """One ConfigError with one line per problem (sorted, de-duplicated), or nothing.

    Past MAX_PROBLEM_LINES the rest are counted: one mistake repeated in a big
    file should not bury the first lines.
    """
    if not problems:
        return
    lines = list(dict.fromkeys(str(p) for p in sorted(problems, key=_problem_order)))
    if len(lines) > MAX_PROBLEM_LINES:
        more = len(lines) - MAX_PROBLEM_LINES
        lines = [*lines[:MAX_PROBLEM_LINES], f"... and {more} more problem{'s' * (more > 1)}"]
    raise ConfigError("\n".join(lines), hint=hint)


def _problem_order(p: Problem) -> tuple[int, int, str]:
    return (p.line, p.col, p.message)


def cut(text: str, limit: int = 60) -> str:
    """Text for a message, cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: Any, limit: int = 60) -> str:
    """A value for a message: repr, cut to `limit` characters (a 7 MB value is not echoed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null (nothing)"
    text = repr(value) if isinstance(value, str | int | float | type(None)) else _brief(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _brief(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping {" + ", ".join(f"{cut(str(k), 20)}: ..." for k in list(value)[:3]) + \
            (", ..." if len(value) > 3 else "") + "}"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)}"
    return type(value).__name__


def unreadable_reason(path: Path) -> str | None:
    """Why `path` is not a regular file we can read, or None when it is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except ValueError:
        return "the path contains a NUL character"
    except OSError as e:
        return f"cannot read: {e.strerror}"
    return _not_regular(st.st_mode)


def _not_regular(mode: int) -> str | None:
    for test, kind in _FILE_KINDS:
        if test(mode):
            return f"is {kind}, not a regular file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def read_source(path: Path) -> bytes:
    """The bytes of a regular file (or of standard input for `-`), at most MAX_FILE_BYTES.

    Special files are refused before they are opened for reading in earnest:
    a FIFO nobody writes would block forever, /dev/zero never ends.
    """
    name = display_path(path)
    if path == STDIN:
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    else:
        reason = unreadable_reason(path)
        if reason:
            hint = "check the path (configs live in configs/)" if reason == "no such file" \
                else None
            raise ConfigError(f"{name}: {reason}", hint=hint)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise ConfigError(f"{name}: cannot read: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            reason = _not_regular(os.fstat(f.fileno()).st_mode)  # replaced since the stat?
            if reason:
                raise ConfigError(f"{name}: {reason}")
            try:
                data = f.read(MAX_FILE_BYTES + 1)
            except OSError as e:
                raise ConfigError(f"{name}: cannot read: {e.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_FILE_BYTES // 1024} KiB; netbed's YAML "
                          "files are a few KB (is this the right file?)")
    return data


def decode(data: bytes, name: str) -> str:
    """UTF-8 text (a leading BOM is dropped); anything else is refused where it goes wrong."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{name}:1:1: the file is UTF-16; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{name}:{line}:{col}: not UTF-8 text (byte 0x{data[e.start]:02X}); "
                          "save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")
    bad = _NOT_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        col = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        raise ConfigError(f"{name}:{line}:{col}: control character U+{ord(bad.group()):04X} is "
                          "not allowed in YAML; delete it (write \\t, \\x07 ... inside double "
                          "quotes if it is meant)")
    return text


_FLOW_LIMIT = 200   # unclosed [ and {: far above any real file, far below slow scanning


def _check_flow_depth(text: str, name: str) -> None:
    """Refuse deep `[[[[...` before parsing: ruamel's scanner is quadratic in flow depth.

    A rough count (brackets inside quoted text count too), so its limit is far
    above MAX_DEPTH, which the exact check in `plain` enforces.
    """
    depth = 0
    for m in re.finditer(r"[\[\]{}]", text):
        depth += 1 if m.group() in "[{" else -1
        if depth > _FLOW_LIMIT:
            line = text.count("\n", 0, m.start()) + 1
            col = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
            raise ConfigError(f"{name}:{line}:{col}: more than {_FLOW_LIMIT} unclosed '[' or "
                              f"'{{': nested too deeply (netbed's files nest a few levels)")
        depth = max(depth, 0)


class _Constructor(RoundTripConstructor):
    """Round-trip constructor that refuses integers too long to be meant (and to convert)."""

    def construct_yaml_int(self, node: Any) -> Any:
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_NUMBER_DIGITS:
            raise ConstructorError(None, None, f"a number of {digits} digits is far too large "
                                   f"(at most {MAX_NUMBER_DIGITS} digits)", node.start_mark)
        return super().construct_yaml_int(node)


_Constructor.add_constructor("tag:yaml.org,2002:int", _Constructor.construct_yaml_int)


def load_yaml(path: Path) -> Source:
    """Read and parse `path` (`-`: standard input); every failure is a ConfigError."""
    return parse_yaml(read_source(path), path)


def parse_yaml(data: bytes, path: Path) -> Source:
    """Parse YAML bytes in round-trip mode; syntax errors become a ConfigError at line:col."""
    name = display_path(path)
    text = decode(data, name)
    _check_flow_depth(text, name)
    yaml = YAML(typ="rt")
    yaml.Constructor = _Constructor
    try:
        tree = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(s.strip() for s in (e.context, e.problem) if s).strip()
        ctx = e.context_mark
        if ctx and mark and (ctx.line, ctx.column) != (mark.line, mark.column):
            what += f" (it started at line {ctx.line + 1}, column {ctx.column + 1})"
        kind = "" if isinstance(e, ConstructorError) else "YAML syntax error: "
        raise ConfigError(f"{name}:{line}:{col}: {kind}{cut(what, 300)}") from None
    except YAMLError as e:
        raise ConfigError(f"{name}:1:1: YAML error: {cut(str(e), 300)}") from None
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply for the YAML parser (netbed's files "
                          f"nest a few levels; at most {MAX_DEPTH})") from None
    empty = tree is None
    if empty:
        tree = CommentedMap()
    return Source(path, tree, text, empty)


_STR_TAG = "tag:yaml.org,2002:str"


def plain(src: Source, node: Any = None, *, drop_x_keys: bool = False) -> Any:
    """ruamel's round-trip tree -> plain dict/list/str/int/float/bool/None for pydantic.

    Aliases are expanded here (ruamel keeps them as shared nodes), so this is
    where an alias bomb is stopped: at MAX_VALUES values, or MAX_DEPTH levels.
    With `drop_x_keys`, top-level `x-...` keys are left out *before* anything
    under them is expanded. Tags, dates, sets and binary data are refused with
    the position of the value.
    """
    root = src.tree if node is None else node
    return _plain(src, root, (), [MAX_VALUES], drop_x_keys)


def _plain(src: Source, node: Any, loc: tuple[str | int, ...], budget: list[int],
           drop_x_keys: bool = False) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise_problems([src.problem(loc, f"the file holds more than {MAX_VALUES} values "
                                    "(counting what YAML aliases `*name` repeat); netbed's "
                                    "files hold a few hundred")])
    if len(loc) > MAX_DEPTH:
        raise_problems([src.problem(loc, f"nested more than {MAX_DEPTH} levels deep")])
    tag = getattr(getattr(node, "tag", None), "value", None)
    if isinstance(node, dict | list) and tag is not None:
        raise_problems([src.problem(loc, f"YAML tag {shown(tag)} is not supported; "
                                    "netbed files use plain YAML")])
    if isinstance(node, dict):
        out: dict[Any, Any] = {}
        for k in node:
            if not isinstance(k, str):
                raise_problems([src.problem(loc, f"a key must be a name, not {shown(k)} "
                                            "(quote it if it is meant)")])
            if drop_x_keys and k.startswith("x-"):
                continue
            out[str(k)] = _plain(src, node[k], (*loc, str(k)), budget)
        return out
    if isinstance(node, list):
        return [_plain(src, v, (*loc, i), budget) for i, v in enumerate(node)]
    if isinstance(node, TaggedScalar):
        if node.tag.value == _STR_TAG:  # !!str 12: the text "12"
            return str(node.value)
        raise_problems([src.problem(loc, f"YAML tag {shown(node.tag.value)} is not supported; "
                                    "netbed files use plain YAML")])
    if node is None or isinstance(node, bool):
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, bytes):
        what = "binary data (!!binary)"
    elif isinstance(node, datetime.date):
        what = "a date"
    else:
        what = f"a YAML {type(node).__name__.removeprefix('Commented').lower()}"
    raise_problems([src.problem(loc, f"{what} is not a value netbed understands here; "
                                "quote it if it is meant as text")])
    raise AssertionError("unreachable")  # pragma: no cover - raise_problems raised


def locate(tree: Any, loc: tuple[str | int, ...], *, key: bool = False) -> tuple[int, int]:
    """1-based (line, col) of the deepest node on `loc` present in the tree.

    Scalars point at the value; mappings and sequences at their key (the line a
    user looks for). `key=True` points at the last key itself (unknown keys).
    """
    node = tree
    pos = (getattr(getattr(tree, "lc", None), "line", 0) or 0,
           getattr(getattr(tree, "lc", None), "col", 0) or 0)
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        try:
            if isinstance(node, CommentedMap) and part in node:
                child = node[part]
                if (last and key) or isinstance(child, (CommentedMap, CommentedSeq)):
                    pos = node.lc.key(part)
                else:
                    pos = node.lc.value(part)
                node = child
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                pos = node.lc.item(part)
                node = node[part]
            else:
                break
        except (KeyError, IndexError, TypeError):  # merged (<<:) keys carry no position
            break
    return pos[0] + 1, pos[1] + 1


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('axes', 'policy', 2) -> 'axes.policy[2]' (cut when a deep path gets long)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out if len(out) <= 100 else out[:100] + "..."


def _unwrap(tp: Any) -> Any:
    """The model class inside list[X], X | None, dict[str, X], Annotated[X, ...]."""
    for _ in range(5):
        origin = typing.get_origin(tp)
        if origin is None:
            return tp
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if origin is typing.Annotated or origin in (list, tuple, set, frozenset):
            tp = args[0]
        elif origin is dict:
            tp = args[1]
        elif origin in (typing.Union, types.UnionType):
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = models[0] if models else args[0]
        else:
            return tp
    return tp


def model_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at `loc` (for 'allowed keys')."""
    current: Any = root
    pending: Any = None
    for part in loc:
        if pending is not None:  # inside a list/dict field: this part is an index or a dict key
            current, pending = pending, None
            if isinstance(current, type) and issubclass(current, BaseModel):
                continue
            return None
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        inner = _unwrap(field.annotation)
        origin = typing.get_origin(field.annotation)
        container = origin in (list, tuple, dict) or (
            origin in (typing.Union, types.UnionType)
            and any(typing.get_origin(a) in (list, tuple, dict)
                    for a in typing.get_args(field.annotation)))
        if container:
            pending = inner
        else:
            current = inner
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def allowed_keys(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [name for name, f in model.model_fields.items() if not f.exclude]


def did_you_mean(word: str, choices: list[str]) -> str:
    if len(word) > 100:
        return ""
    close = difflib.get_close_matches(str(word), choices, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


_EXPECTED = re.compile(r"'([^']*)'")


def validation_problems(src: Source, err: ValidationError,
                        root: type[BaseModel], prefix: tuple[str | int, ...] = ()) -> list[Problem]:
    """pydantic's errors -> one Problem per error, with position, path and what is allowed."""
    problems: list[Problem] = []
    for e in err.errors(include_url=False):
        # h-repeat (#11): drop tagged-union branch names ('@...') from inner positions
        kind = e["type"]
        raw = tuple(e["loc"])
        inner, last = (raw[:-1], raw[-1:]) if kind == "extra_forbidden" else (raw, ())
        loc = prefix + tuple(p for p in inner if not str(p).startswith("@")) + last
        inp = e.get("input")
        if kind == "extra_forbidden":
            parent = loc[:-1]
            allowed = allowed_keys(model_at(root, parent[len(prefix):]))
            msg = f"unknown key {shown(loc[-1])}"
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})" + did_you_mean(str(loc[-1]), allowed)
            problems.append(_problem(src, parent, loc, msg, key=True))
        elif kind == "missing":
            problems.append(_problem(src, loc[:-1], loc[:-1], f"missing required key {loc[-1]!r}"))
        elif kind in ("literal_error", "enum"):
            allowed = _EXPECTED.findall(str(e.get("ctx", {}).get("expected", "")))
            msg = f"bad value {shown(inp)}"
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
                msg += did_you_mean(str(inp), allowed) if isinstance(inp, str) else ""
            problems.append(src.problem(loc, msg + colon_hint(inp)))
        elif kind in ("bool_type", "bool_parsing"):
            problems.append(src.problem(loc, f"bad value {shown(inp)} (allowed: on, off, true, "
                                        "false)" + type_hint(inp, boolean=True)))
        elif kind in ("value_error", "assertion_error"):
            text = str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            problems.append(src.problem(loc, text))
        else:
            problems.append(src.problem(loc, f"bad value {shown(inp)}: {_expected(kind, e)}"
                                        + type_hint(inp)))
    return problems


# pydantic error types -> what the value should have been, in the user's words.
_WANTED = {
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "string_type": "expected text",
    "list_type": "expected a list, e.g. [a, b]",
    "dict_type": "expected a mapping of keys to values",
    "model_type": "expected a mapping of keys to values",
    "model_attributes_type": "expected a mapping of keys to values",
    "too_short": "the list is empty; give at least one value",
}


def _expected(kind: str, e: Any) -> str:
    if kind in _WANTED:
        return _WANTED[kind]
    ctx = e.get("ctx") or {}
    for key, word in (("ge", "at least"), ("gt", "more than"), ("le", "at most"),
                      ("lt", "less than")):
        if key in ctx:
            return f"must be {word} {ctx[key]}"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} entries"
    return _lower_first(str(e["msg"]))


def colon_hint(value: Any) -> str:
    """The space-after-colon slip: `TCP_RR: 64` in a flow list is a mapping, not `TCP_RR:64`."""
    if isinstance(value, dict) and len(value) == 1:
        k, v = next(iter(value.items()))
        if isinstance(k, str) and isinstance(v, str | int | float | type(None)):
            return (f"; `{k}: {v}` is a mapping because of the space after ':' "
                    f"(write {k}:{'' if v is None else v} or quote it)")
    return ""


def type_hint(value: Any, *, boolean: bool = False) -> str:
    """A hint for values YAML read differently than the user meant."""
    if isinstance(value, bool):
        return " (true/false is not a number)"
    if isinstance(value, str):
        word = value.strip().lower()
        if boolean and word in ("yes", "no", "y", "n"):
            return " (YAML 1.2 reads yes/no as text: write on or off)"
        if word.lstrip("+-").isdigit():
            return (" (use ASCII digits 0-9)" if not word.isascii()
                    else " (a number in quotes is text: drop the quotes)")
    if isinstance(value, float):
        return " (no decimal point or exponent: write e.g. 1000, not 1e3 or 1000.0)"
    return colon_hint(value)


def _problem(src: Source, path_loc: tuple[str | int, ...], pos_loc: tuple[str | int, ...],
             message: str, *, key: bool = False) -> Problem:
    line, col = locate(src.tree, pos_loc, key=key)
    return Problem(src.name, line, col, format_loc(path_loc), message)


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]
