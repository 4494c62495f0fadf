"""Registries: the names that specs, rules and configs use, open to plug-ins.

Every pluggable concept of qjax keeps one :class:`Registry` in the module that owns it: number
formats (:data:`qjax.numerics.formats.FORMATS`), rounding schemes
(:data:`qjax.numerics.rounding.ROUNDINGS`), calibration methods
(:data:`qjax.numerics.spec.CALIBRATIONS`), estimators (:data:`qjax.ste.ESTIMATORS`) and the
experiment tasks (``experiments.tasks``). The built-ins are registered there through the same
registry and looked up by the same code as plug-ins; they are *sealed* (reserved: a plug-in cannot
replace or remove them), because the rest of the library relies on what they compute.

A registered name is a plain string, so specs and rules that hold one stay hashable (static under
``jax.jit``) and round-trip through config files.

**Loading plug-ins.** A plug-in module registers its names when it is imported. Three ways bring it
in: importing it yourself; :func:`load_plugins` with its name (what a sweep config's ``plugins:``
list does); or an entry point of the group :data:`ENTRY_POINT_GROUP` (``qjax.plugins``) in an
installed package, whose value is a module (imported) or a ``module:function`` (called with no
arguments). Entry points are loaded once per process, lazily: by :func:`load_plugins` (the sweep
runner calls it when it reads a config) or on the first lookup of a name no registry holds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from qjax.numerics.fields import SpecError, SpecTypeError, did_you_mean

T = TypeVar("T")
ENTRY_POINT_GROUP = "qjax.plugins"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*")


class PluginError(ImportError):
    """A plug-in module or entry point could not be loaded; the message names it and the fix."""


def unknown_name(registry: Registry[Any], value: object, field: str) -> str:
    """The default refusal: ``{field}={value!r} is not one of [...]; did you mean ...?``."""
    names = list(registry.names())
    return f"{field}={value!r} is not one of {names}{did_you_mean(value, names)}"


class Registry(Generic[T]):
    """Names of one kind (``"estimator"``, ``"rounding scheme"``, ...) mapped to their implementations.

    Args:
      kind: what a name stands for, in messages.
      field: the spec or config field that holds such a name (``SpecError.field`` of a refusal).
      unknown: ``unknown(registry, value, field) -> message`` for a name not registered
        (default :func:`unknown_name`: the names, built-ins then plug-ins, with a suggestion).
      example: a name for the message that refuses a non-string (default: the first registered).
    """

    def __init__(
        self,
        kind: str,
        field: str,
        unknown: Callable[[Registry[Any], object, str], str] = unknown_name,
        example: str | None = None,
    ):
        self.kind = kind
        self.field = field
        self._unknown = unknown
        self._example = example
        self._entries: dict[str, T] = {}
        self._sealed: frozenset[str] = frozenset()

    def register(self, name: str, impl: T, *, override: bool = False) -> T:
        """Add ``name``; returns ``impl``. A name already registered raises ``ValueError`` unless
        ``override=True``; a built-in name always does."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"{self.kind} name {name!r} must be a string of letters, digits and '_.+-' that starts "
                "with a letter, e.g. 'noise' (it is written in specs and config files)"
            )
        if name in self._sealed:
            raise ValueError(
                f"{self.kind} {name!r} is built into qjax and cannot be replaced; register yours "
                f"under another name, e.g. 'my_{name}'"
            )
        if name in self._entries and not override:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; pass override=True to replace it, "
                "or choose another name"
            )
        self._entries[name] = impl
        return impl

    def unregister(self, name: str) -> None:
        """Remove the plug-in ``name`` (built-ins cannot be removed)."""
        if name in self._sealed:
            raise ValueError(f"{self.kind} {name!r} is built into qjax and cannot be removed")
        if name not in self._entries:
            raise KeyError(f"no {self.kind} {name!r} is registered")
        del self._entries[name]

    def seal(self) -> None:
        """Mark every name registered so far as built-in (done once, by the owning module)."""
        self._sealed = frozenset(self._entries)

    def is_builtin(self, name: object) -> bool:
        return name in self._sealed

    def names(self) -> tuple[str, ...]:
        """Every registered name: the built-ins, then the plug-ins, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: object, field: str | None = None) -> T:
        """The implementation of ``name``. A name not registered loads the entry points (once per
        process) and is looked up again; then raises :class:`~qjax.numerics.fields.SpecError`
        (:class:`~qjax.numerics.fields.SpecTypeError` for a non-string) with ``field``."""
        field = field or self.field
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        if not isinstance(name, str):
            example = self._example or next(iter(self._entries), "name")
            raise SpecTypeError(
                f"{field}={name!r} must be a string such as {example!r}; got {type(name).__name__}",
                field=field,
            )
        load_entry_points()
        if name in self._entries:
            return self._entries[name]
        raise SpecError(self._unknown(self, name, field), field=field)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def parse_name(registry: Registry[Any], builtins: type[Any], value: object, field: str) -> Any:
    """A registered name as a spec field keeps it: the member of the string enum ``builtins`` for a
    built-in, the plain string for a plug-in; anything else raises as :meth:`Registry.get`."""
    registry.get(value, field)
    return builtins(value) if registry.is_builtin(value) else str(value)


class _EntryPoints:
    """The entry points of :data:`ENTRY_POINT_GROUP` loaded in this process."""

    def __init__(self) -> None:
        self.scanned = False
        self.loaded: set[tuple[str, str]] = set()


_ENTRY_POINTS = _EntryPoints()


def load_entry_points(*, rescan: bool = False) -> list[str]:
    """Load the ``qjax.plugins`` entry points of the installed packages not loaded yet; returns
    their names. The packages are scanned once per process (``rescan=True``: again, e.g. after
    installing one); each entry point is loaded at most once. A module value is imported, a
    ``module:function`` value is called with no arguments.

    Raises :class:`PluginError` naming the entry point and its package when one fails.
    """
    if _ENTRY_POINTS.scanned and not rescan:
        return []
    _ENTRY_POINTS.scanned = True  # before loading: a lookup inside a plug-in must not rescan
    done = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (ep.name, ep.value)
        if key in _ENTRY_POINTS.loaded:
            continue
        _ENTRY_POINTS.loaded.add(key)
        try:
            target = ep.load()
            if callable(target) and not isinstance(target, types.ModuleType):
                target()
        except Exception as e:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "its package"
            raise PluginError(
                f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP!r}, from {dist}) failed: "
                f"{type(e).__name__}: {e}. Fix or uninstall {dist}"
            ) from e
        done.append(ep.name)
    return done


def load_plugins(modules: Iterable[str] = (), *, entry_points: bool = True) -> None:
    """Import the plug-in modules ``modules`` by name (``"examples.noise_estimator"``), each of
    which registers its names on import, then (``entry_points``) the ``qjax.plugins`` entry points.

    Raises :class:`PluginError` naming the module and ``sys.path`` when one cannot be imported.
    """
    for name in modules:
        if not isinstance(name, str) or not name:
            raise PluginError(f"a plug-in is named by a module name string, e.g. 'my_plugins'; got {name!r}")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise _failed(name, e) from e
            raise PluginError(
                f"plug-in module {name!r} cannot be imported: {e}. It is looked up on sys.path = "
                f"{sys.path}; run from the folder that holds it, or add that folder to PYTHONPATH"
            ) from e
        except Exception as e:
            raise _failed(name, e) from e
    if entry_points:
        load_entry_points()


def _failed(name: str, e: BaseException) -> PluginError:
    return PluginError(f"plug-in module {name!r} failed while being imported: {type(e).__name__}: {e}")
