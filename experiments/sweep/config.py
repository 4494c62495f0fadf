"""Experiment configs: YAML files -> validated sweeps of
:class:`~experiments.sweep.schema.ExperimentConfig` cells.

**File format.** A YAML mapping of the :class:`ExperimentConfig` fields plus two keys:

* ``base: path`` or ``base: [path, ...]``: files (relative to the including file) merged under this
  one in order, later winning. Mappings merge key by key; other values (lists too) are replaced.
  ``sweep`` merges axis by axis (an axis is replaced whole; ``axis: null`` removes one).
* ``sweep:`` the grid. ``dotted.key: [v1, v2, ...]`` is an axis over one config key; a *named axis*
  ``name: {label: {dotted.key: value, ...}, ...}`` (``name`` not a config key) sets several keys per
  label. The cells are the cartesian product of the axes in the order written (the first axis
  varies slowest), e.g. ``seed: [0, 1]`` x ``bits: {W8A8, W4A8}`` gives
  ``seed=0,bits=W8A8``, ``seed=0,bits=W4A8``, ``seed=1,bits=W8A8``, ``seed=1,bits=W4A8``.

Command-line overrides ``dotted.key=value`` (``value`` read as YAML: ``sweep.seed=[0,1,2]``,
``train.epochs=3``) are applied after the base files; ``sweep.<axis>=...`` sets or removes an axis.
Scalars follow YAML 1.1 (as ``yaml.safe_load``) except that ``1e-3`` reads as a float.

**Validation** happens before any compute: every cell is built and checked (unknown keys with a
suggestion, types, impossible values, ``qjax.QuantSpec`` and ``qjax.nn.Rule`` construction: the
cell's :class:`~experiments.sweep.plan.Plan`), and all
problems of the grid are raised together as one :class:`ConfigError`, one line per distinct problem:
``<cells>: <dotted.path>: <problem; fix>``, where ``<cells>`` is the smallest axis description of the
cells that have it (``bits=W9A8 (6 cells)``, ``all 12 cells``) or their labels. The checks of one
config are :mod:`experiments.sweep.validation`'s; this module gathers them over the grid. Two axes (or an
axis and a command-line override) setting the same key, and two cells with the same config, are
problems too.

**Cells.** ``label`` ``axis=value,...`` (``base`` with no axes); ``slug`` a directory name: the
values (numbers after their key's last part) joined by ``_``, cut to 48 characters, then ``-`` and 8
hex digits of the hash, e.g. ``seed0_ptq_W4A8-1a2b3c4d``.

**Hash.** ``Cell.hash = sha256(canonical JSON of to_dict(config) without HASH_EXCLUDED)``, canonical
meaning ``json.dumps(sort_keys=True, separators=(",", ":"))``; ints given for floats are stored as
floats, so ``learning_rate: 1`` and ``1.0`` hash alike. ``output_dir``, ``report``, ``mesh``,
``resources`` and ``tracking`` are excluded: moving a sweep, changing how it is reported, the devices
it runs on or what it logs while training does not change what a cell computes (on a mesh, up to
float rounding: ``experiments.sweep.placement``). ``plugins`` is hashed when it is not empty (the
modules decide what a plug-in name computes); an empty list leaves the hash of a config as it was
before the key existed. Likewise ``quant.attention`` is hashed when it is set, not when null.

**Plug-ins.** The modules of the top-level ``plugins:`` list are imported (:func:`import_plugins`)
before any cell is validated, so the names they register (estimators, formats, rounding schemes,
calibration methods, tasks, models) resolve; the ``qjax.plugins`` entry points of installed packages
are loaded then too. ``plugins`` is one list for the whole sweep: it cannot be a sweep axis. Ray
workers import the same list before they run a cell (``experiments.sweep.parallel``); with several
processes per cell each process reads the config, so each imports them.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import itertools
import json
import os
import pathlib
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

import qjax
from experiments.sweep import validation
from experiments.sweep.plan import Plan
from experiments.sweep.schema import ExperimentConfig

HASH_EXCLUDED = ("output_dir", "report", "mesh", "resources", "tracking")
_MISSING: Any = object()


@dataclasses.dataclass(frozen=True)
class Problem:
    """One config problem: which cells (or file, or ``command line``), dotted path, problem and fix."""

    where: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.path}: {self.message}" if self.path else f"{self.where}: {self.message}"


class ConfigError(ValueError):
    """All problems of a config, one per line; ``problems`` holds them as :class:`Problem` values.

    ``ConfigError(source, problems)`` heads the list with ``source``; ``ConfigError(message)`` is a
    plain message (for problems found elsewhere, e.g. against the model)."""

    def __init__(self, source: str, problems: Sequence[Problem] = ()):
        self.problems = tuple(problems)
        n = len(self.problems)
        head = f"{source}: {n} config problem{'s' if n != 1 else ''}" if n else source
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


@dataclasses.dataclass(frozen=True)
class Axis:
    """A sweep axis: ``values[i]`` (a key's value, or a named axis's label) applies ``settings[i]``."""

    name: str
    values: tuple[Any, ...]
    settings: tuple[dict[str, Any], ...]
    named: bool

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(_fmt(v) for v in self.values)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: ``label`` ``axis=value,...``; ``slug`` its directory name; ``axes`` axis ->
    value (or label); ``hash`` the SHA-256 of its resolved config (see the module docstring);
    ``plan`` the typed rules and settings validation built from the config."""

    label: str
    slug: str
    axes: dict[str, Any]
    config: ExperimentConfig
    hash: str
    plan: Plan


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: the config before the sweep (``base``), its axes and its grid of cells;
    ``raw`` is the merged mapping they came from (base files and overrides applied, ``sweep`` kept)."""

    base: ExperimentConfig
    axes: tuple[Axis, ...]
    grid: tuple[Cell, ...]
    source: str = ""
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def cells(self) -> list[Cell]:
        return list(self.grid)

    def listing(self) -> str:
        """The grid as text (what ``--dry-run`` prints): a header, then ``index  label  slug`` lines."""
        shape = " x ".join(f"{a.name} ({len(a.values)})" for a in self.axes) or "no axes"
        n = len(self.grid)
        lines = [f"{self.base.name}: {n} cell{'s' if n != 1 else ''} = {shape}"]
        width = max(len(c.label) for c in self.grid)
        lines += [f"{i:4d}  {c.label.ljust(width)}  {c.slug}" for i, c in enumerate(self.grid, 1)]
        return "\n".join(lines)

    def dump_yaml(self) -> str:
        """The merged config with its ``sweep:`` block as YAML: this sweep, without base files."""
        return yaml.safe_dump(self.raw, sort_keys=False, default_flow_style=False)


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# ----------------------------------------------------------------------------- reading and merging


def _merge(base: dict[str, Any], over: Mapping[str, Any], top: bool = True) -> dict[str, Any]:
    """Deep merge: mappings key by key, anything else replaced; ``sweep`` axis by axis."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        if top and key == "sweep" and isinstance(old, dict) and isinstance(value, dict):
            out[key] = {**old, **copy.deepcopy(value)}
        elif isinstance(old, dict) and isinstance(value, dict):
            out[key] = _merge(old, value, top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: pathlib.Path, stack: tuple[pathlib.Path, ...] = ()) -> dict[str, Any]:
    """The mapping of ``path`` with its ``base:`` files merged under it."""
    fail = lambda msg: ConfigError(str(stack[0] if stack else path), [Problem(str(path), "", msg)])
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise fail(f"base include cycle {chain}; remove one of these base: entries")
    if not path.is_file():
        where = f" (base of {stack[-1]})" if stack else ""
        raise fail(f"no such config file{where}")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise fail("not a text (UTF-8) file; a config is a YAML file") from None
    except yaml.YAMLError as e:
        raise fail(f"not valid YAML: {e}") from None
    if data is None:
        raise fail("the file is empty; a config needs at least task: and name: (see configs/quickstart.yaml)")
    if not isinstance(data, dict):
        raise fail(f"a config is a mapping of keys to values; got {type(data).__name__}")
    bases = data.pop("base", None)
    bases = [bases] if isinstance(bases, str) else bases or []
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise fail(f"base: must be a path or a list of paths; got {bases!r}")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _merge(merged, _read((path.parent / b).resolve(), (*stack, path)))
    return _merge(merged, data)


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    """``d[a][b][c] = value`` for ``dotted = "a.b.c"``, creating missing (or null) mappings."""
    parts = dotted.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], dict):
            at = ".".join(parts[: i + 1])
            raise ValueError(f"cannot set {dotted}: {at} is {node[part]!r}, not a mapping")
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[str], problems: list[Problem]) -> list[str]:
    """Apply ``dotted.key=value`` items to ``raw`` in place; returns the (non-sweep) keys set."""
    keys = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        bad = lambda msg, k=item: problems.append(Problem("command line", k, msg))
        if not sep or not key:
            bad("expected dotted.key=value, e.g. train.epochs=3 or sweep.seed=[0,1,2]")
            continue
        try:
            value = _yaml(text)
        except yaml.YAMLError as e:
            bad(f"value {text!r} is not valid YAML ({e})", key)
            continue
        if key.split(".")[0] == "base":
            bad("base files cannot be overridden; edit the config file", key)
        elif key.startswith("sweep."):
            if not isinstance(raw.get("sweep"), dict):
                raw["sweep"] = {}
            raw["sweep"][key[len("sweep.") :]] = value
        else:
            try:
                _set_path(raw, key, value)
                keys.append(key)
            except ValueError as e:
                bad(str(e), key)
    return keys


def from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of a nested mapping (as :func:`to_dict` writes it); types are
    checked (value checks are :func:`load`'s); raises :class:`ConfigError`."""
    out: validation.Problems = []
    cfg = validation.build(ExperimentConfig, data, "", out)
    if out:
        raise ConfigError("config", [Problem("config", p, m) for p, m in out])
    return typing.cast(ExperimentConfig, cfg)


def to_dict(config: Any) -> Any:
    """Nested plain values (dicts, lists, scalars) of a config dataclass, in field order."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, enum.Enum):
        return config.value
    return config


def dump_yaml(config: ExperimentConfig) -> str:
    """The resolved config as YAML (field order); ``from_dict(yaml.safe_load(text)) == config``."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def config_hash(config: ExperimentConfig) -> str:
    """SHA-256 hex of the canonical JSON of ``to_dict(config)`` without :data:`HASH_EXCLUDED`
    (and without ``plugins`` when it is empty, ``quant.attention`` when it is null)."""
    d = {k: v for k, v in to_dict(config).items() if k not in HASH_EXCLUDED}
    if not d.get("plugins"):
        d.pop("plugins", None)
    if d.get("quant", {}).get("attention") is None:
        d.get("quant", {}).pop("attention", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (mappings only; lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def normalized_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's config as today's schema reads it (fields added since it ran take their
    defaults), or as recorded when today's schema cannot read it."""
    raw = record.get("config") or {}
    try:
        return to_dict(from_dict(raw))
    except (KeyError, TypeError, ValueError):
        return dict(raw)


def config_differences(
    a: Mapping[str, Any], b: Mapping[str, Any], ignore: Sequence[str] = ()
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for every key where the config dicts ``a`` and ``b``
    differ, leaving out :data:`HASH_EXCLUDED` and the keys in ``ignore`` (with what is under them)."""
    skip = (*HASH_EXCLUDED, *ignore)
    fa, fb = flatten(a), flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [
        (k, fa.get(k), fb.get(k))
        for k in keys
        if fa.get(k) != fb.get(k) and not any(k == s or k.startswith(s + ".") for s in skip)
    ]


def get_path(data: Mapping[str, Any], dotted: str, default: Any = _MISSING) -> Any:
    """``data[a][b][c]`` for ``dotted = "a.b.c"``; ``default`` (else ``KeyError``) when absent."""
    node: Any = data
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif default is not _MISSING:
            return default
        else:
            raise KeyError(
                f"{dotted!r}: no key {part!r} in {sorted(node) if isinstance(node, Mapping) else node!r}"
            )
    return node


# ----------------------------------------------------------------------------- the sweep


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)


def _parse_axes(sweep: Any, problems: list[Problem]) -> list[Axis]:
    """The axes of a ``sweep:`` mapping (null axes are removed ones)."""
    if sweep is None:
        return []
    bad = lambda path, msg: problems.append(Problem("sweep", path, msg))
    if not isinstance(sweep, dict):
        bad("sweep", "must be a mapping of axes, e.g. {seed: [0, 1], method.name: [ptq, qat]}")
        return []
    axes = []
    for name, spec in sweep.items():
        name, path = str(name), f"sweep.{name}"
        if spec is None:
            continue
        if isinstance(spec, list) and spec and not validation.is_config_path(name):
            bad(
                path,
                f"{validation.unknown_path(name)} (a named axis is a mapping label -> {{dotted.key: value}})",
            )
        elif isinstance(spec, list) and spec:
            axes.append(Axis(name, tuple(spec), tuple({name: v} for v in spec), named=False))
        elif isinstance(spec, dict) and spec and validation.is_config_path(name):
            bad(
                path,
                f"{name} is a config key: its axis is a list of values ({name}: [a, b]); "
                "a named axis needs a name that is not a config key",
            )
        elif isinstance(spec, dict) and spec and validation.looks_like_config_path(name):
            bad(path, validation.unknown_path(name))
        elif isinstance(spec, dict) and spec:
            settings = {str(k): v for k, v in spec.items()}
            wrong = [
                k
                for k, v in settings.items()
                if not (isinstance(v, dict) and all(isinstance(x, str) for x in v))
            ]
            for label in wrong:
                bad(
                    f"{path}.{label}",
                    "a named axis label maps dotted config keys to values, e.g. {quant.weights.dtype: int4}",
                )
            if not wrong:
                axes.append(Axis(name, tuple(settings), tuple(settings.values()), named=True))
        else:
            bad(
                path,
                "an axis is a non-empty list of values (seed: [0, 1, 2]) or, for a named axis, "
                "a mapping label -> {dotted.key: value}",
            )
    return axes


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _check_conflicts(axes: Sequence[Axis], cli_keys: Sequence[str], problems: list[Problem]) -> None:
    """Two axes (or an axis and a command-line override) setting the same key: one would be lost."""
    keys = [(a.name, k) for a in axes for k in dict.fromkeys(k for s in a.settings for k in s)]
    for i, (axis_a, key_a) in enumerate(keys):
        for axis_b, key_b in keys[i + 1 :]:
            if axis_a != axis_b and _overlap(key_a, key_b):
                problems.append(
                    Problem(
                        "sweep",
                        f"sweep.{axis_b}",
                        f"sets {key_b}, which axis {axis_a!r} also sets "
                        f"({key_a}); each key may vary along one axis only",
                    )
                )
    for cli in cli_keys:
        for axis, key in keys:
            if _overlap(cli, key):
                problems.append(
                    Problem(
                        "command line",
                        cli,
                        f"sweep axis {axis!r} sets {key} in every cell; "
                        f"override the axis instead, e.g. sweep.{axis}=[...]",
                    )
                )
                break


def _slug(axes: Sequence[Axis], values: Sequence[Any], digest: str) -> str:
    """``<readable prefix>-<8 hex of the hash>``: strings as they are, numbers after their key."""
    parts = []
    for axis, value in zip(axes, values, strict=True):
        text = value if isinstance(value, str) else f"{axis.name.rsplit('.', 1)[-1]}{_fmt(value)}"
        parts.append(re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-."))
    prefix = "_".join(p for p in parts if p)[:48].strip("_-.") or "cell"
    return f"{prefix}-{digest[:8]}"


def _where(failing: Sequence[int], grid: Sequence[dict[str, str]]) -> str:
    """The smallest ``axis=label`` description of exactly the cells ``failing`` (else their labels)."""
    n, target = len(grid), set(failing)
    if not grid[0]:
        return "config"
    if len(target) == n:
        return f"all {n} cells" if n > 1 else _label(grid[0])
    matches = lambda desc: {i for i, g in enumerate(grid) if all(g[a] == v for a, v in desc.items())}
    desc = {a: v for a, v in grid[failing[0]].items() if all(grid[i][a] == v for i in failing)}
    for a in list(desc):
        trial = {k: v for k, v in desc.items() if k != a}
        if trial and matches(trial) == target:
            desc = trial
    if desc and matches(desc) == target:
        text = _label(desc)
        return text if len(target) == 1 else f"{text} ({len(target)} cells)"
    labels = [_label(grid[i]) for i in failing]
    return "; ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")


def _label(axes: Mapping[str, str]) -> str:
    return ",".join(f"{a}={v}" for a, v in axes.items()) or "base"


def _build_cell(
    raw: dict[str, Any], axes: Sequence[Axis], combo: Sequence[int]
) -> tuple[Any, Plan | None, validation.Problems]:
    """The typed config of one cell, its plan (``None`` if it has problems) and its problems."""
    d = copy.deepcopy(raw)
    out: validation.Problems = []
    for axis, i in zip(axes, combo, strict=True):
        for key, value in axis.settings[i].items():
            try:
                _set_path(d, key, value)
            except ValueError as e:
                out.append((key, str(e)))
    cfg = validation.build(ExperimentConfig, d, "", out)
    plan = None
    if cfg is not None:
        plan, found = validation.make_plan(cfg, [a.name for a in axes])
        out += found
    return cfg, plan, list(dict.fromkeys(out))


_CALIBRATION_OPTIONS = (("percentile", "percentile"), ("mse_grid", "mse"))


def _ignored_options(cells: Sequence[Cell]) -> list[Problem]:
    """``quant.weights.percentile`` (or ``mse_grid``) given where no cell of the sweep calibrates
    with ``percentile`` (``mse``): an option every cell would ignore. (A sweep over the calibration
    that sets it for all its cells uses it in some: that is fine.)"""
    problems = []
    for section in ("weights", "activations"):
        specs = [getattr(c.config.quant, section) or {} for c in cells]
        for option, calibration in _CALIBRATION_OPTIONS:
            given = [s for s in specs if option in s]
            if given and not any(s.get("calibration", "minmax") == calibration for s in specs):
                path = f"quant.{section}.{option}"
                msg = (
                    f"{given[0][option]!r} is ignored: no cell calibrates with {calibration!r}; remove it, "
                    f"or set quant.{section}.calibration: {calibration}"
                )
                problems.append(Problem("all cells", path, msg))
    return problems


def _cells(body: dict[str, Any], axes: Sequence[Axis], found: list[Problem]) -> list[Cell]:
    """Every cell of the grid, in order; the problems of the invalid ones go to ``found``."""
    names = [a.name for a in axes]
    grid = [dict(zip(names, labels, strict=True)) for labels in itertools.product(*(a.labels for a in axes))]
    failing: dict[tuple[str, str], list[int]] = {}
    cells: list[Cell] = []
    for n, combo in enumerate(itertools.product(*(range(len(a.values)) for a in axes))):
        cfg, plan, out = _build_cell(body, axes, combo)
        for key in out:
            failing.setdefault(key, []).append(n)
        if not out and plan is not None:
            values = [a.values[i] for a, i in zip(axes, combo, strict=True)]
            digest = config_hash(cfg)
            slug = _slug(axes, values, digest)
            axes_of = dict(zip(names, values, strict=True))
            cells.append(Cell(_label(grid[n]), slug, axes_of, cfg, digest, plan))
    found += [Problem(_where(idx, grid), path, msg) for (path, msg), idx in failing.items()]
    found += _ignored_options(cells)
    first: dict[str, Cell] = {}
    for c in cells:
        if first.setdefault(c.hash, c) is not c:
            msg = f"same resolved config as cell {first[c.hash].label}; remove the duplicate axis value"
            found.append(Problem(c.label, "sweep", msg))
    return cells


def import_plugins(names: Any) -> list[Problem]:
    """Import the plug-in modules ``names`` (a config's ``plugins`` list) and the ``qjax.plugins``
    entry points; the problems (a bad list, a module that cannot be imported: named with
    ``sys.path``) as :class:`Problem` values. The current directory is searched after ``sys.path``
    (``qjax-run`` is a console script, whose ``sys.path`` does not hold it)."""
    if names is None:
        names = []
    if isinstance(names, str):
        names = validation.split_keys(names)
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        return [
            Problem("config", "plugins", f"must be a list of module names, e.g. [my_plugins]; got {names!r}")
        ]
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    problems = []
    for i, name in enumerate(names):
        try:
            qjax.load_plugins([name], entry_points=False)
        except qjax.PluginError as e:
            problems.append(Problem("config", f"plugins[{i}]", str(e)))
    try:
        qjax.numerics.load_entry_points()
    except qjax.PluginError as e:
        problems.append(Problem("installed packages", "", str(e)))
    return problems


def _plugin_axes(axes: Sequence[Axis]) -> list[Problem]:
    """``plugins`` set by a sweep axis: it is imported once for the whole sweep."""
    return [
        Problem(
            "sweep",
            f"sweep.{a.name}",
            "sets plugins, which is one list for the whole sweep; list them at the top level",
        )
        for a in axes
        if any(k == "plugins" or k.startswith("plugins.") for s in a.settings for k in s)
    ]


def expand(
    raw: Mapping[str, Any],
    source: str = "config",
    cli_keys: Sequence[str] = (),
    problems: Sequence[Problem] = (),
) -> SweepSpec:
    """The validated :class:`SweepSpec` of a merged config mapping (with its ``sweep:``); raises
    :class:`ConfigError` with every problem of the grid (and ``problems`` found before). The
    config's ``plugins`` are imported first (a plug-in that cannot be imported stops here)."""
    plugin_problems = import_plugins(raw.get("plugins"))
    if plugin_problems:
        raise ConfigError(source, [*problems, *plugin_problems])
    found = list(problems)
    body = {k: v for k, v in raw.items() if k != "sweep"}
    axes = _parse_axes(raw.get("sweep"), found)
    found += _plugin_axes(axes)
    _check_conflicts(axes, cli_keys, found)
    cells = _cells(body, axes, found)
    base_out: validation.Problems = []
    base = validation.build(ExperimentConfig, body, "", base_out)
    reported = {(p.path, p.message) for p in found}
    found += [Problem("base config (before the sweep)", p, m) for p, m in base_out if (p, m) not in reported]
    if base is not None and base.report.baseline is not None and len(base.report.columns) == 1:
        axis = next((a for a in axes if a.name == base.report.columns[0]), None)
        if axis is not None and str(base.report.baseline) not in axis.labels:
            msg = (
                f"{base.report.baseline!r} is not a label of the column axis {axis.name!r}: "
                f"one of {list(axis.labels)}"
            )
            found.append(Problem("report", "report.baseline", msg))
    if found:
        raise ConfigError(source, found)
    return SweepSpec(
        base=base, axes=tuple(axes), grid=tuple(cells), source=source, raw=copy.deepcopy(dict(raw))
    )


def load(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> SweepSpec:
    """Read the config file ``path`` (with its ``base:`` files), apply the command-line
    ``overrides`` (``dotted.key=value``), expand and validate the sweep.

    Raises :class:`ConfigError` listing every problem of every cell.
    """
    file = pathlib.Path(path).resolve()
    raw = _read(file)
    problems: list[Problem] = []
    cli_keys = _apply_overrides(raw, overrides, problems)
    return expand(raw, str(path), cli_keys, problems)
