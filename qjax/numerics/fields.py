"""Field checks shared by qjax's frozen configs (``QuantSpec``, ``Rule``, ``AdaRoundConfig``, ...).

A config that refuses a value raises :class:`SpecError` (a ``ValueError``) or
:class:`SpecTypeError` (a ``TypeError``), whose ``field`` names the field at fault (``None`` when
the problem is not one field's), so that a caller reporting the problem under a dotted config path
(``quant.weights.granularity``) reads the field from the exception, never from its wording.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.StrEnum)


class SpecError(ValueError):
    """A config field has an impossible value; ``field`` names it (``None``: several fields)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class SpecTypeError(TypeError):
    """A config field has the wrong type; ``field`` names it (``None``: not one field's)."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``value`` (``""`` if none is close)."""
    hint = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def parse_enum(cls: type[E], value: Any, arg: str) -> E:
    """``cls(value)``: a member of the string enum ``cls`` from itself or its value.

    Raises :class:`SpecError` (``field=arg``): ``{arg}={value!r} is not one of [...]; did you mean
    ...?``.
    """
    try:
        return cls(value)
    except ValueError:
        names = [m.value for m in cls]
        raise SpecError(
            f"{arg}={value!r} is not one of {names}{did_you_mean(value, names)}", field=arg
        ) from None


def reject_unknown_fields(owner: str, keys: Iterable[object], fields: Sequence[str]) -> None:
    """Raise :class:`SpecError` for the first of ``keys`` that is not one of ``fields`` (``field``:
    that key): ``unknown {owner} field 'x'; did you mean 'y'? Fields: ...``."""
    for key in keys:
        if key not in fields:
            raise SpecError(
                f"unknown {owner} field {key!r}{did_you_mean(key, fields)} Fields: {', '.join(fields)}",
                field=str(key),
            )
