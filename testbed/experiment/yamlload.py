"""YAML files -> plain data plus the positions needed for `file:line:col` errors.

Shared by `testbed.experiment.config` (experiments) and `testbed.experiment.policies` (policy data).
ruamel.yaml's round-trip loader keeps a line/column on every mapping key and
sequence item; pydantic reports errors as a `loc` path. This module joins the
two, so every problem a user can make in a YAML file is reported as
`configs/x.yaml:12:5: axes.policy[2]: <what is wrong and what is allowed>`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from testbed.errors import ConfigError


def display_path(path: Path) -> str:
    """The path as a user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Source:
    """A loaded YAML file: the round-trip tree (for positions) and its path."""

    path: Path
    tree: Any

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


def raise_problems(problems: list[Problem], hint: str | None = None) -> None:
    """One ConfigError with one line per problem (sorted, de-duplicated), or nothing."""
    if not problems:
        return
    lines = list(dict.fromkeys(str(p) for p in sorted(problems, key=_problem_order)))
    raise ConfigError("\n".join(lines), hint=hint)


def _problem_order(p: Problem) -> tuple[int, int, str]:
    return (p.line, p.col, p.message)


def load_yaml(path: Path) -> Source:
    """Parse `path` in round-trip mode; syntax errors become a ConfigError at file:line:col."""
    name = display_path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file",
                          hint="check the path (configs live in configs/)") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read: {e.strerror}") from None
    yaml = YAML(typ="rt")
    try:
        tree = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(s.strip() for s in (e.context, e.problem) if s).strip()
        ctx = e.context_mark
        if ctx and mark and (ctx.line, ctx.column) != (mark.line, mark.column):
            what += f" (it started at line {ctx.line + 1}, column {ctx.column + 1})"
        raise ConfigError(f"{name}:{line}:{col}: YAML syntax error: {what}") from None
    except YAMLError as e:
        raise ConfigError(f"{name}:1:1: YAML error: {e}") from None
    if tree is None:
        tree = CommentedMap()
    return Source(path, tree)


def plain(node: Any) -> Any:
    """ruamel's round-trip types -> plain dict/list/str/int/float/bool for pydantic."""
    if isinstance(node, dict):
        return {plain(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


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
    """('axes', 'policy', 2) -> 'axes.policy[2]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


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
    close = difflib.get_close_matches(str(word), choices, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


_EXPECTED = re.compile(r"'([^']*)'")


def validation_problems(src: Source, err: ValidationError,
                        root: type[BaseModel], prefix: tuple[str | int, ...] = ()) -> list[Problem]:
    """pydantic's errors -> one Problem per error, with position, path and what is allowed."""
    problems: list[Problem] = []
    for e in err.errors(include_url=False):
        loc = prefix + tuple(e["loc"])
        kind = e["type"]
        inp = e.get("input")
        if kind == "extra_forbidden":
            parent = loc[:-1]
            allowed = allowed_keys(model_at(root, parent[len(prefix):]))
            msg = f"unknown key {loc[-1]!r}"
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})" + did_you_mean(str(loc[-1]), allowed)
            problems.append(_problem(src, parent, loc, msg, key=True))
        elif kind == "missing":
            problems.append(_problem(src, loc[:-1], loc[:-1], f"missing required key {loc[-1]!r}"))
        elif kind in ("literal_error", "enum"):
            allowed = _EXPECTED.findall(str(e.get("ctx", {}).get("expected", "")))
            msg = f"bad value {inp!r}"
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})" + did_you_mean(str(inp), allowed)
            problems.append(src.problem(loc, msg))
        elif kind == "bool_parsing" or kind == "bool_type":
            problems.append(src.problem(loc, f"bad value {inp!r} (allowed: on, off, true, false)"))
        elif kind in ("value_error", "assertion_error"):
            text = str(e["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            problems.append(src.problem(loc, text))
        else:
            problems.append(src.problem(loc, f"bad value {inp!r}: {_lower_first(e['msg'])}"))
    return problems


def _problem(src: Source, path_loc: tuple[str | int, ...], pos_loc: tuple[str | int, ...],
             message: str, *, key: bool = False) -> Problem:
    line, col = locate(src.tree, pos_loc, key=key)
    return Problem(src.name, line, col, format_loc(path_loc), message)


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]
