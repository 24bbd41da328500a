"""One base for gapnet's configs: typed fields with comments, checked, round-tripped through JSON.

A config is a dataclass that derives from `Config` and declares each field on one line, with
its constraints in `option(...)` and its help text as the comment at the end of the line
(nanoGPT style)::

    @dataclass
    class Toy(Config):
        epochs: int = option(10, low=0)  # passes over the training set
        optimizer: str = option("adamw", choices=("adamw", "sgd"))  # update rule

`Config` then checks every field against its type hint and constraints when the object is made
(errors name the class, the field and the value), converts JSON's lists back into tuples,
writes and reads plain dicts (`to_dict` / `from_dict`, unknown keys are named), and reads the
comments back (`field_help`), which is what the command line shows as each flag's help. So a
new option is one line.

Example:
    >>> @dataclass
    ... class Toy(Config):
    ...     epochs: int = option(10, low=0)  # passes over the data
    ...     sizes: tuple[int, ...] = option((28,), low=1)  # input sizes
    >>> Toy.from_dict({"sizes": [20, 28]})
    Toy(epochs=10, sizes=(20, 28))
    >>> Toy(epochs=-1)
    Traceback (most recent call last):
    ...
    ValueError: Toy.epochs must be an int >= 0, got -1
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import numbers
import textwrap
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

C = TypeVar("C", bound="Config")
_MISSING: Any = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    low: float | None = None,
    high: float | None = None,
    below: float | None = None,
    above: float | None = None,
    choices: Sequence[Any] | None = None,
    nonempty: bool = False,
) -> Any:
    """A dataclass field with the constraints `Config` checks.

    Args:
        default, default_factory: as `dataclasses.field`.
        low, high: inclusive bounds of a number (of each element for tuples).
        below, above: exclusive bounds of a number.
        choices: allowed values (of each element for tuples).
        nonempty: a string or tuple must not be empty.
    """
    meta = {"low": low, "high": high, "below": below, "above": above, "choices": choices,
            "nonempty": nonempty}  # fmt: skip
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class Config:
    """Base of gapnet's configs; see the module docstring."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{type(self).__name__}.{f.name}"
            value = convert(where, getattr(self, f.name), hints[f.name], f.metadata)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Rules between fields; subclasses raise ValueError via `fail`."""

    def fail(self, name: str, what: str) -> typing.NoReturn:
        """Raise the ValueError of field `name`: "<Class>.<name> <what>, got <value>"."""
        raise ValueError(f"{type(self).__name__}.{name} {what}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls: type[C], d: Any) -> C:
        """The config from `to_dict`'s output (or JSON); missing keys take their defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; known keys: {', '.join(known)}"
            )
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (unknown names fail, naming themselves)."""
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each field's help text: the comment at the end of its line in the class's source."""
        return {f.name: f.help for f in cls.options()}

    @classmethod
    def options(cls) -> list[Option]:
        """Every field with its type, constraints, default, help and section, in order."""
        hints, notes = _hints(cls), dict(_comments(cls))
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not _MISSING else f.default_factory()  # type: ignore[misc,operator]
            group, text = notes.get(f.name, ("", ""))
            out.append(Option(f.name, hints[f.name], f.metadata, default, text, group))
        return out


@dataclass(frozen=True)
class Option:
    """One field of a config as the command line sees it (`Config.options`)."""

    name: str
    hint: Any  # the type hint: int, float, str, bool, X | None, tuple[...], dict[...]
    meta: Any  # option()'s constraints
    default: Any
    help: str  # the comment at the end of the field's line
    group: str  # the section comment above it ("data", "model", ...), or ""

    def check(self, value: Any) -> Any:
        """`value` checked and normalised as the config would; ValueError says what is wrong
        (without naming the field: "must be an int >= 0, got -1")."""
        try:
            return convert("", value, self.hint, self.meta)
        except ValueError as e:
            raise ValueError(str(e).strip()) from None


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def convert(where: str, value: Any, hint: Any, meta: Any) -> Any:
    """`value` checked against the type `hint` and the `option` constraints, normalised; errors
    start with `where` (the field's name)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(f"{where} must be a sequence, got {_describe(value)}")
        fixed = len(args) != 2 or args[1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise ValueError(f"{where} must be {len(args)} values, got {tuple(value)!r}")
        if meta.get("nonempty") and not value:
            raise ValueError(f"{where} must not be empty, got ()")
        items = [
            _scalar(f"{where}[{i}]", v, args[i] if fixed else args[0], meta, tuple(value))
            for i, v in enumerate(value)
        ]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a dict, got {_describe(value)}")
        try:  # JSON-normalised (tuples become lists), so a reloaded config compares equal
            return json.loads(json.dumps(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} must be JSON-serialisable: {e}") from None
    return _scalar(where, value, origin, meta, None)


def _scalar(where: str, value: Any, kind: Any, meta: Any, whole: tuple[Any, ...] | None) -> Any:
    """One bool, int, float or str checked against `meta`; `whole` is the tuple it is part of."""
    shown = repr(value) if whole is None else repr(whole)
    where = where if whole is None else where.rsplit("[", 1)[0]
    low, high = meta.get("low"), meta.get("high")
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be a bool, got {_describe(value)}")
        return value
    if kind is int:
        bad = isinstance(value, bool) or not isinstance(value, numbers.Integral)
        if bad or (low is not None and value < low) or (high is not None and value > high):
            bound = f" >= {low}" if low is not None else ""
            bound += f" and <= {high}" if high is not None else ""
            noun = "ints" if whole is not None else "an int"
            raise ValueError(f"{where} must be {noun}{bound}, got {shown}")
        return int(value)
    if kind is float:
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
        if not ok or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {_describe(value)}")
        value = float(value)
        _check_range(where, value, meta, shown)
        return value
    choices = meta.get("choices")
    if choices is not None and (
        isinstance(value, bool) is not isinstance(choices[0], bool) or value not in choices
    ):
        raise ValueError(
            f"{where} must be one of {', '.join(map(repr, choices))}, got {_describe(value)}"
        )
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {_describe(value)}")
        if meta.get("nonempty") and not value:
            raise ValueError(f"{where} must not be empty")
    return value


def _check_range(where: str, value: float, meta: Any, shown: str) -> None:
    low, high, below, above = (meta.get(k) for k in ("low", "high", "below", "above"))
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"{where} must be in [{low}, {high}], got {shown}")
    if low is not None and below is not None and not low <= value < below:
        raise ValueError(f"{where} must be in [{low}, {below}), got {shown}")
    if low is not None and high is None and below is None and value < low:
        raise ValueError(f"{where} must be >= {low}, got {shown}")
    if above is not None and not value > above:
        raise ValueError(f"{where} must be > {above}, got {shown}")


_HINTS: dict[type, dict[str, Any]] = {}  # per config class: its resolved type hints


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _comments(cls: Any) -> tuple[tuple[str, tuple[str, str]], ...]:
    """(field, (section, comment)) for each field of `cls` and its dataclass bases."""
    names = {f.name for f in dataclasses.fields(cls)}
    found: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins
        if not dataclasses.is_dataclass(klass) or klass is Config:
            continue
        try:
            source = inspect.getsource(cast(type, klass))
        except (OSError, TypeError):  # no source (frozen app, interactive class)
            continue
        found.update(_line_comments(source, names))
    return tuple(found.items())


def _line_comments(source: str, names: set[str]) -> dict[str, tuple[str, str]]:
    """`name: type = ...  # comment` lines of a class body (a field's first line only), each
    with the last `# section` comment line above it."""
    out: dict[str, tuple[str, str]] = {}
    current: str | None = None
    section = ""
    for tok in tokenize.generate_tokens(io.StringIO(textwrap.dedent(source)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names:
            current = tok.string if tok.line.strip().startswith(f"{tok.string}:") else None
            if current is not None:
                out.setdefault(current, (section, ""))
        elif tok.type == tokenize.COMMENT and current is not None:
            out[current] = (section, tok.string.lstrip("#").strip())
            current = None
        elif tok.type == tokenize.COMMENT and tok.start[1] == 4 and tok.line.strip() == tok.string:
            section = tok.string.lstrip("#").strip()  # a comment line of its own: a section
        elif tok.type == tokenize.NEWLINE:
            current = None
    return out
