"""Validation of one experiment config: typed building from plain mappings, then value checks.

:func:`build` turns a nested mapping into the :mod:`experiments.sweep.schema` dataclasses field by field:
unknown keys are named with a suggestion (``train.epoch: unknown key; did you mean
'train.epochs'?``), types are checked (an int is fine where a float is expected and is stored as a
float; a bool is not an int; lists stand for tuples; a string enum field takes one of its values,
with a suggestion; a comma-separated string stands for a tuple of strings: ``rows: "a,b"``), and
a bad field keeps its default so that one pass finds every problem.
:func:`make_plan` then finds the impossible values of a typed config (sizes and counts below their
minimum, unknown names with a suggestion, ``quant`` specs that ``qjax.QuantSpec.from_dict`` or
``qjax.nn.Rule`` refuse, under the dotted path of the field their error names (``quant.attention``
included), stochastic rounding without ``quant.rounding_seed``, PTQ/QAT without anything to
quantize, distillation outside QAT on the llm task) and, for a valid config,
builds its :class:`~experiments.sweep.plan.Plan`: each spec and rule once.

Problems are ``(dotted path, message)`` pairs; :mod:`experiments.sweep.config` gathers them over a sweep.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import jax

import qjax
from experiments.sweep import placement, tracking
from experiments.sweep.plan import Plan
from experiments.sweep.schema import (
    ExperimentConfig,
    LayerOverride,
    LearnedRounding,
    Method,
    Optimizer,
    QuantConfig,
    Schedule,
)
from qjax.numerics.fields import did_you_mean
from qjax.numerics.rounding import needs_key


def weight_estimators() -> tuple[str, ...]:
    """The registered estimators a weight takes (plug-ins included; not ``pact``, ``lsq_plus``)."""
    return tuple(e for e in qjax.estimator_names() if e not in (qjax.Estimator.PACT, qjax.Estimator.LSQ_PLUS))


def activation_estimators() -> tuple[str, ...]:
    """The registered estimators an activation takes (plug-ins included; not ``kmeans_finetune``)."""
    return tuple(e for e in qjax.estimator_names() if e != qjax.Estimator.KMEANS_FINETUNE)


ACTIVATION_SCALES = tuple(e.value for e in qjax.nn.ActivationScale)
OBSERVERS = tuple(e.value for e in qjax.nn.Observer)

Problems = list[tuple[str, str]]
Specs = tuple[qjax.QuantSpec | None, qjax.QuantSpec | None]  # (weights, activations)


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of a schema dataclass."""
    return typing.get_type_hints(cls)


def _strip_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


@functools.cache
def all_paths() -> tuple[str, ...]:
    """Every dotted key of :class:`ExperimentConfig` (sections and leaves)."""

    def walk(cls: type, prefix: str) -> list[str]:
        out = []
        for name, tp in hints(cls).items():
            path = f"{prefix}{name}"
            out.append(path)
            if dataclasses.is_dataclass(tp):
                out += walk(typing.cast(type, tp), f"{path}.")
        return out

    return tuple(walk(ExperimentConfig, ""))


def is_config_path(dotted: str) -> bool:
    """Whether ``dotted`` names a config key (keys under mapping fields such as ``quant.weights``
    and ``task.model_args`` count: their contents are checked when the cell is built)."""
    tp: Any = ExperimentConfig
    for part in dotted.split("."):
        if typing.get_origin(tp) is dict:
            return True
        if part not in _fields_of(tp):
            return False
        tp = _strip_none(_fields_of(tp)[part])
    return True


def _fields_of(tp: Any) -> dict[str, Any]:
    return hints(tp) if isinstance(tp, type) and dataclasses.is_dataclass(tp) else {}


def unknown_key(section: str, key: str, fields: Sequence[str]) -> str:
    """``unknown key; did you mean 'section.field'?`` (a near field here, else the same key elsewhere)."""
    near = difflib.get_close_matches(key, list(fields), n=1)
    if near:
        return f"unknown key; did you mean {join(section, near[0])!r}?"
    elsewhere = [p for p in all_paths() if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"unknown key here; did you mean {' or '.join(map(repr, elsewhere[:2]))}?"
    return f"unknown key; the keys of {section or 'a config'} are {', '.join(fields)}"


def join(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(tp: Any, value: Any, path: str, out: Problems) -> tuple[bool, Any]:
    """``value`` as type ``tp`` (ints for floats, lists for tuples); else a problem and ``False``."""
    base = _strip_none(tp)
    if value is None:
        if base is not tp:
            return True, None
        out.append((path, f"must not be null; expected {_KINDS.get(base, 'a value')}"))
        return False, None
    got = f"got {type(value).__name__} {value!r}"
    origin = typing.get_origin(base)
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            out.append((path, f"expected a mapping of {typing.cast(type, base).__name__} fields; {got}"))
            return False, None
        built = build(typing.cast(type, base), value, path, out)
        return built is not None, built
    if origin is tuple and typing.get_args(base)[0] is str and isinstance(value, str):
        return True, split_keys(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            out.append((path, f"expected a list; {got}"))
            return False, None
        items = [_coerce(typing.get_args(base)[0], v, f"{path}[{i}]", out) for i, v in enumerate(value)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            out.append((path, f"expected a mapping with string keys; {got}"))
            return False, None
        return True, copy.deepcopy(value)
    if base is Any:
        return True, value
    if isinstance(base, type) and issubclass(base, enum.StrEnum) and isinstance(value, str):
        values = [m.value for m in base]
        if value not in values:
            out.append((path, not_one_of(value, values)))
            return False, None
        return True, base(value)
    if isinstance(base, type) and issubclass(base, enum.StrEnum):
        base = str  # anything else: "expected a string"
    ok = isinstance(value, base) and not (isinstance(value, bool) and base is not bool)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return True, float(value)
    if not ok:
        out.append((path, f"expected {_KINDS.get(base, str(base))}; {got}"))
    return ok, value


def split_keys(text: str) -> tuple[str, ...]:
    """A comma-separated list of keys as a tuple: ``"a.b, c"`` -> ``("a.b", "c")`` (blanks dropped)."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def build(cls: type, data: Mapping[str, Any], path: str, out: Problems) -> Any:
    """``cls(**data)`` field by field; bad fields keep their defaults and add a problem to ``out``.
    ``None`` when a required field is missing."""
    fields = hints(cls)
    kwargs = {}
    for key, value in data.items():
        key_path = join(path, str(key))
        if key not in fields:
            out.append((key_path, unknown_key(path, str(key), list(fields))))
            continue
        ok, v = _coerce(fields[key], value, key_path, out)
        if ok:
            kwargs[key] = v
    required = [
        f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in kwargs and name not in data:
            out.append(
                (join(path, name), "required key missing, e.g. path: 'conv1' (a regex of layer paths)")
            )
    return None if any(n not in kwargs for n in required) else cls(**kwargs)


def not_one_of(value: Any, choices: Sequence[str]) -> str:
    """``'x' is not one of a, b, c; did you mean 'b'?``"""
    return f"{value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}"


def _one_of(out: Problems, path: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        out.append((path, not_one_of(value, choices)))


def _at_least(out: Problems, path: str, value: float, low: float, fix: str = "") -> None:
    if not value >= low:
        out.append((path, f"must be >= {low}, got {value}" + (f"; {fix}" if fix else "")))


def _check_run(out: Problems, section: str, c: Any) -> None:
    """Fields shared by ``train`` and ``method`` (the QAT fine-tuning run)."""
    if not c.learning_rate > 0:
        out.append((f"{section}.learning_rate", f"must be > 0, got {c.learning_rate}; e.g. 0.001"))
    _at_least(out, f"{section}.steps", c.steps, 0, "0 means: use epochs")
    if c.steps == 0:
        _at_least(out, f"{section}.epochs", c.epochs, 1, f"or set {section}.steps > 0")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_EPOCHS, MAX_STEPS = 10**6, 10**9


def _check_identity(out: Problems, cfg: ExperimentConfig) -> None:
    """``name`` is one directory under ``output_dir`` (no path separators, no ``..``), ``seed`` is
    a seed numpy accepts (>= 0), and run lengths are ones that end."""
    if not _NAME.fullmatch(cfg.name) or ".." in cfg.name:
        out.append(
            (
                "name",
                f"{cfg.name!r} must be one directory name under output_dir (letters, digits, '.', '_', "
                "'-'; no '/' or '..'), e.g. 'w4a8_sweep'",
            )
        )
    _at_least(out, "seed", cfg.seed, 0, "seeds are non-negative integers")
    for section, run in (("train", cfg.train), ("method", cfg.method)):
        if run.epochs > MAX_EPOCHS:
            out.append(
                (
                    f"{section}.epochs",
                    f"{run.epochs} is more than {MAX_EPOCHS:,} passes; give a run that ends",
                )
            )
        if run.steps > MAX_STEPS:
            out.append(
                (f"{section}.steps", f"{run.steps} is more than {MAX_STEPS:,} steps; give a run that ends")
            )


def _check_task(out: Problems, cfg: ExperimentConfig) -> None:
    from experiments.tasks import task_models, task_names

    task = cfg.task
    _one_of(out, "task.name", task.name, sorted(task_names()))
    _at_least(out, "task.train_limit", task.train_limit, 0, "0 means: all")
    if task.name in task_names():
        try:
            models = task_models(task.name)
        except ImportError as e:
            out.append(("task.name", f"task {task.name!r} cannot be imported: {e}"))
            return
        _one_of(out, "task.model", task.model, sorted(models))


def _check_sections(out: Problems, cfg: ExperimentConfig, axis_names: Sequence[str]) -> None:
    t, m = cfg.train, cfg.method
    _check_run(out, "train", t)
    _check_run(out, "method", m)
    for path, value, low in [
        ("train.batch_size", t.batch_size, 1),
        ("train.warmup_steps", t.warmup_steps, 0),
        ("train.weight_decay", t.weight_decay, 0),
        ("train.checkpoint_every", t.checkpoint_every, 1),
        ("train.keep_checkpoints", t.keep_checkpoints, 1),
        ("calibration.batches", cfg.calibration.batches, 1),
        ("calibration.batch_size", cfg.calibration.batch_size, 1),
        ("eval.batch_size", cfg.eval.batch_size, 1),
        ("eval.limit", cfg.eval.limit, 0),
    ]:
        _at_least(out, path, value, low)
    if t.weight_decay > 0 and t.optimizer != Optimizer.ADAMW:
        out.append(
            ("train.weight_decay", f"only optimizer 'adamw' uses it (optimizer is {str(t.optimizer)!r})")
        )
    if t.warmup_steps > 0 and t.schedule != Schedule.WARMUP_COSINE:
        out.append(
            ("train.warmup_steps", f"only schedule 'warmup_cosine' uses it (schedule is {str(t.schedule)!r})")
        )
    _one_of(out, "eval.kernels", cfg.eval.kernels, qjax.kernels.KERNEL_PATHS)
    if cfg.eval.kernels != "auto" and not (cfg.eval.serve or cfg.eval.export):
        out.append(("eval.kernels", "only the converted model uses it: set eval.serve or eval.export"))
    _check_method_extras(out, cfg)
    _check_mesh(out, cfg)
    if not cfg.resources.cpus > 0:
        out.append(("resources.cpus", f"{cfg.resources.cpus} must be > 0, e.g. 1"))
    _at_least(out, "resources.gpus", cfg.resources.gpus, 0)
    _check_report(out, cfg, axis_names)


def _check_report(out: Problems, cfg: ExperimentConfig, axis_names: Sequence[str]) -> None:
    """``rows`` and ``columns``: at least one key each, each an axis or a config key; ``pool``:
    sweep axes that are neither rows nor columns."""
    r = cfg.report
    for key in ("rows", "columns"):
        if not getattr(r, key):
            out.append((f"report.{key}", "names no key; give at least one, e.g. method.name"))
        for name in getattr(r, key):
            if name not in axis_names and not is_config_path(name):
                near = difflib.get_close_matches(name, [*axis_names, *all_paths()], n=1)
                did = f"; did you mean {near[0]!r}?" if near else ""
                out.append((f"report.{key}", f"{name!r} is neither a sweep axis nor a config key{did}"))
    for name in r.pool:
        if name not in axis_names:
            axes = ", ".join(axis_names) or "none"
            out.append(("report.pool", f"{name!r} is not a sweep axis; pool one of {axes}"))
        elif name in (*r.rows, *r.columns):
            out.append(("report.pool", f"{name!r} is a row or column key; pool it or show it, not both"))


def _check_mesh(out: Problems, cfg: ExperimentConfig) -> None:
    """The mesh fits the devices (all of them with several processes), its ``data`` axis divides
    the training and calibration batches, and the method runs on a mesh (float, PTQ, QAT,
    finetune; not yet the LLM methods, AdaRound or mixed precision)."""
    mesh, m = cfg.mesh, cfg.method
    try:
        data, fsdp = placement.mesh_shape(mesh.data, mesh.fsdp, jax.device_count())
    except ValueError as e:
        out.append(("mesh", str(e).removeprefix("mesh: ").removeprefix("mesh ")))
        return
    processes = jax.process_count()
    if processes > 1 and data * fsdp != jax.device_count():
        out.append(
            (
                "mesh",
                f"data={data} x fsdp={fsdp} uses {data * fsdp} of the {jax.device_count()} devices of "
                f"{processes} processes; with several processes the mesh must use all of them: "
                "set mesh.data=-1 (or sizes whose product is the device count)",
            )
        )
        return
    if data * fsdp == 1 and processes == 1:
        return
    for path, size in (
        ("train.batch_size", cfg.train.batch_size),
        ("calibration.batch_size", cfg.calibration.batch_size),
    ):
        if size % data:
            out.append((path, f"{size} is not divisible by mesh.data={data}; use a multiple of {data}"))
    unsupported = [
        name
        for name, on in (
            ("method.rounding: adaround", m.rounding == LearnedRounding.ADAROUND),
            ("method.bit_budget", m.bit_budget is not None),
            ("method.smoothquant_alpha", m.smoothquant_alpha is not None),
            ("method.awq", m.awq),
            ("method.gptq", m.gptq),
            ("method.rotation", m.rotation is not None),
            ("method.name: llm_int8", m.name == Method.LLM_INT8),
            ("method.distill", m.distill),
        )
        if on
    ]
    if unsupported:
        out.append(
            ("mesh", f"{', '.join(unsupported)}: one device only; drop the mesh section for these cells")
        )


def _check_method_extras(out: Problems, cfg: ExperimentConfig) -> None:
    """AdaRound, mixed-precision, LLM and distillation switches of ``method``."""
    m = cfg.method
    if m.rounding == LearnedRounding.ADAROUND and cfg.quant.weights is None and m.name.quantizes:
        out.append(("method.rounding", "AdaRound rounds weights: set quant.weights"))
    _at_least(out, "method.adaround_iterations", m.adaround_iterations, 1)
    _at_least(out, "method.adaround_samples", m.adaround_samples, 1)
    if m.adaround_lr <= 0:
        out.append(("method.adaround_lr", f"{m.adaround_lr} must be > 0, e.g. 0.001"))
    _at_least(out, "method.sensitivity_examples", m.sensitivity_examples, 1)
    if m.bit_budget is not None:
        if m.bit_budget <= 0:
            out.append(("method.bit_budget", f"{m.bit_budget} must be > 0 bits per weight, e.g. 4"))
        if cfg.quant.weights is None:
            out.append(("method.bit_budget", "mixed precision allocates weight widths: set quant.weights"))
    _check_llm_methods(out, cfg)
    _check_distill(out, cfg)
    if m.from_scratch and m.name not in (Method.QAT, Method.FINETUNE):
        out.append(
            (
                "method.from_scratch",
                f"trains the model from its initialization in the method's run: set method.name: qat "
                f"or finetune (it is {str(m.name)!r}), or method.from_scratch: false",
            )
        )
    if not m.candidate_bits or any(not 2 <= b <= 8 for b in m.candidate_bits):
        out.append(
            ("method.candidate_bits", f"{list(m.candidate_bits)} must be widths in 2..8, e.g. [2, 3, 4, 8]")
        )


def _check_llm_methods(out: Problems, cfg: ExperimentConfig) -> None:
    """SmoothQuant, AWQ, GPTQ, rotations and LLM.int8() run on the ``llm`` task's Llama models."""
    m = cfg.method
    used = [
        name
        for name, on in (
            ("method.smoothquant_alpha", m.smoothquant_alpha is not None),
            ("method.awq", m.awq),
            ("method.gptq", m.gptq),
            ("method.rotation", m.rotation is not None),
            ("method.name", m.name == Method.LLM_INT8),
        )
        if on
    ]
    for key in used:
        if cfg.task.name != "llm":
            out.append(
                (key, f"runs on the llm task's models (task.name is {cfg.task.name!r}); set task.name: llm")
            )
        elif key != "method.name" and m.name not in (Method.PTQ, Method.QAT):
            out.append(
                (
                    key,
                    "is a post-training method (or the start of QAT): set method.name: ptq or qat "
                    f"(it is {str(m.name)!r})",
                )
            )
    _at_least(out, "method.rotation_seed", m.rotation_seed, 0)
    if m.rotation is None and m.rotation_qk:
        out.append(("method.rotation_qk", "rotates with method.rotation: set it to hadamard"))
    if m.rotation is not None and m.rotation_online_down and m.smoothquant_pairs:
        out.append(
            (
                "method.smoothquant_pairs",
                "folds into up_proj, but method.rotation_online_down rotates down_proj's input "
                "between up_proj and down_proj: drop one of them",
            )
        )
    if m.smoothquant_pairs and m.smoothquant_alpha is None:
        out.append(("method.smoothquant_pairs", "smooths with method.smoothquant_alpha: set it, e.g. 0.5"))
    if m.smoothquant_alpha is not None and not 0.0 <= m.smoothquant_alpha <= 1.0:
        out.append(("method.smoothquant_alpha", f"{m.smoothquant_alpha} must be in [0, 1], e.g. 0.5"))
    if (m.awq or m.gptq) and cfg.quant.weights is None:
        out.append(("method.awq" if m.awq else "method.gptq", "quantizes weights: set quant.weights"))
    _at_least(out, "method.awq_grid", m.awq_grid, 1)
    _at_least(out, "method.gptq_block_size", m.gptq_block_size, 1)
    if m.gptq_damp <= 0:
        out.append(("method.gptq_damp", f"{m.gptq_damp} must be > 0, e.g. 0.01"))
    if m.llm_int8_threshold < 0:
        out.append(("method.llm_int8_threshold", f"{m.llm_int8_threshold} must be >= 0, e.g. 6.0"))
    _check_qat_from_ptq(out, cfg)


def _check_distill(out: Problems, cfg: ExperimentConfig) -> None:
    """Distillation trains a quantized student of the llm task against its float model."""
    m = cfg.method
    if m.distill:
        if cfg.task.name != "llm":
            out.append(
                (
                    "method.distill",
                    f"distils the llm task's next-token distributions (task.name is {cfg.task.name!r}); "
                    "set task.name: llm, or method.distill: false",
                )
            )
        if m.name != Method.QAT:
            out.append(
                (
                    "method.distill",
                    "trains the quantized model against the float one: set method.name: qat "
                    f"(it is {str(m.name)!r}), or method.distill: false",
                )
            )
    if not m.distill_temperature > 0:
        out.append(("method.distill_temperature", f"{m.distill_temperature} must be > 0, e.g. 1.0"))
    if not 0.0 <= m.distill_weight <= 1.0:
        out.append(
            (
                "method.distill_weight",
                f"{m.distill_weight} must be in [0, 1] (1: pure distillation), e.g. 1.0",
            )
        )
    for key, value in (("distill_temperature", m.distill_temperature), ("distill_weight", m.distill_weight)):
        if not m.distill and value != 1.0:
            out.append((f"method.{key}", "only distillation uses it: set method.distill: true"))


def _check_qat_from_ptq(out: Problems, cfg: ExperimentConfig) -> None:
    """``keep_ptq_grid: false`` needs QAT from AWQ or GPTQ with calibrated (not learned) scales;
    ``freeze`` needs a training method."""
    m, q = cfg.method, cfg.quant
    if not m.keep_ptq_grid:
        if m.name != Method.QAT or not (m.awq or m.gptq):
            out.append(
                (
                    "method.keep_ptq_grid",
                    "only QAT from a PTQ method uses it: set method.name: qat with method.awq or "
                    "method.gptq, or remove it",
                )
            )
        estimators = [q.weight_estimator, *(o.weight_estimator for o in q.overrides)]
        if qjax.Estimator.LSQ in estimators:
            out.append(
                (
                    "method.keep_ptq_grid",
                    "false recomputes the scales from the weights, but weight_estimator 'lsq' learns "
                    "them: set keep_ptq_grid: true (LSQ starts from the PTQ grid) or weight_estimator: ste",
                )
            )
    if m.freeze and m.name not in (Method.QAT, Method.FINETUNE):
        out.append(
            ("method.freeze", f"only qat and finetune train parameters (method.name is {str(m.name)!r})")
        )
    for i, pattern in enumerate(m.freeze):
        try:
            re.compile(pattern)
        except re.error as e:
            out.append(
                (f"method.freeze[{i}]", f"{pattern!r} is not a regular expression ({e}); e.g. 'embed'")
            )
    if cfg.eval.before_qat and m.name != Method.QAT:
        out.append(("eval.before_qat", f"only a qat cell uses it (method.name is {str(m.name)!r})"))


def override_specs(
    quant: QuantConfig, o: LayerOverride
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The QuantSpec fields of an override's weights and activations: its own fields over the
    ``quant`` ones (``null`` inherits)."""
    w = (
        None
        if quant.weights is None and o.weights is None
        else {**(quant.weights or {}), **(o.weights or {})}
    )
    a = quant.activations if o.activations is None else {**(quant.activations or {}), **o.activations}
    return w, a


def _parse_spec(
    out: Problems, path: str, fields: dict[str, Any] | None, seed: int | None
) -> tuple[bool, qjax.QuantSpec | None]:
    """``(ok, spec)``: the QuantSpec of ``fields`` (``None`` for ``None``); a refusal goes to ``out``
    under ``path``, or under ``path.<field>`` when the error names its field."""
    if fields is None:
        return True, None
    try:
        spec = qjax.QuantSpec.from_dict(fields)
    except (qjax.SpecError, qjax.SpecTypeError) as e:
        out.append((join(path, e.field) if e.field else path, str(e)))
        return False, None
    except (ValueError, TypeError) as e:  # not one field's (e.g. block_shape: 3 is not a list)
        out.append((path, str(e)))
        return False, None
    if needs_key(spec.rounding) and seed is None:
        out.append(
            (
                f"{path}.rounding",
                f"rounding={str(spec.rounding)!r} needs a key: set quant.rounding_seed, e.g. 0",
            )
        )
        return False, None
    return True, spec


def _quant_specs(out: Problems, q: QuantConfig, method: Method) -> tuple[Specs, list[Specs | None]] | None:
    """The (weights, activations) specs of ``quant`` and of each override (``None``: keep_float);
    ``None`` when a problem was found (in ``out``)."""
    n = len(out)
    _one_of(out, "quant.weight_estimator", q.weight_estimator, weight_estimators())
    _one_of(out, "quant.activation_estimator", q.activation_estimator, activation_estimators())
    _one_of(out, "quant.activation_scale", q.activation_scale, ACTIVATION_SCALES)
    _one_of(out, "quant.observer", q.observer, OBSERVERS)
    ok_w, weights = _parse_spec(out, "quant.weights", q.weights, q.rounding_seed)
    ok_a, acts = _parse_spec(out, "quant.activations", q.activations, q.rounding_seed)
    if method.quantizes and q.weights is None and q.activations is None and q.attention is None:
        needs = "needs quant.weights, quant.activations or quant.attention; e.g. weights: {dtype: int8}"
        out.append(("quant", f"method.name={str(method)!r} {needs}"))
    defaults = (weights, acts) if ok_w and ok_a else None
    overrides = [_override(out, f"quant.overrides[{i}]", q, o, defaults) for i, o in enumerate(q.overrides)]
    return None if len(out) > n or defaults is None else (defaults, overrides)


def _override(
    out: Problems, p: str, q: QuantConfig, o: LayerOverride, defaults: Specs | None
) -> Specs | None:
    """The checked specs of one override (``None``: keep_float, or the ``quant`` specs are refused:
    their own errors are reported under ``quant.*``)."""
    try:
        re.compile(o.path)
    except re.error as e:
        out.append(
            (f"{p}.path", f"{o.path!r} is not a regular expression ({e}); e.g. 'conv1' or 'blocks/.*'")
        )
    if o.keep_float and (
        o.weights or o.activations or o.gradients or o.weight_estimator or o.activation_estimator
    ):
        out.append((p, "keep_float: true keeps the layers in float; remove its other fields"))
    if o.weight_estimator is not None:
        _one_of(out, f"{p}.weight_estimator", o.weight_estimator, weight_estimators())
    if o.activation_estimator is not None:
        _one_of(out, f"{p}.activation_estimator", o.activation_estimator, activation_estimators())
    if defaults is None or o.keep_float:
        return None
    merged = override_specs(q, o)
    own = (o.weights, o.activations)
    inherited = (q.weights, q.activations)
    specs = []
    for side, name in enumerate(("weights", "activations")):
        if not own[side] and merged[side] == inherited[side]:  # the quant spec itself, parsed above
            specs.append(defaults[side])
            continue
        _, spec = _parse_spec(out, f"{p}.{name}", merged[side], q.rounding_seed)
        specs.append(spec)
    return specs[0], specs[1]


def _rules(out: Problems, q: QuantConfig, specs: tuple[Specs, list[Specs | None]]) -> list[qjax.nn.Rule]:
    """The ``qjax.nn.Rule`` of every override and the catch-all rule (see :class:`Plan`); a rule's
    refusal (e.g. static activation scales need per-tensor activations) goes to ``out``."""
    defaults, overrides = specs
    entries = [
        (f"quant.overrides[{i}]", o.path, s, o.weight_estimator, o.activation_estimator, o.gradients)
        for i, (o, s) in enumerate(zip(q.overrides, overrides, strict=True))
    ]
    entries.append(("quant", ".*", defaults, None, None, None))
    rules = []
    for where, path, s, west, aest, grads in entries:
        if s is None:  # keep_float: an exclusion
            rules.append(qjax.nn.Rule(path=path))
            continue
        grads_field = f"{where}.gradients" if grads else "quant.gradients"
        try:
            fields = grads or q.gradients
            gradients = None if fields is None else qjax.nn.GradientSpec.from_dict(fields)
        except (ValueError, TypeError) as e:
            field = getattr(e, "field", None)
            out.append((f"{grads_field}.{field}" if field else grads_field, str(e)))
            continue
        try:
            rule = qjax.nn.Rule(
                path=path,
                weights=s[0],
                activations=s[1],
                weight_estimator=west or q.weight_estimator,
                activation_estimator=aest or q.activation_estimator,
                activation_scale=q.activation_scale,
                observer=q.observer,
                gradients=gradients,
                amax_history=q.amax_history,
            )
        except (ValueError, TypeError) as e:
            field = getattr(e, "field", None)
            out.append((f"{where}.amax_history" if field == "amax_history" else where, str(e)))
        else:
            rules.append(rule)
    return rules


ATTENTION_ESTIMATORS = (qjax.Estimator.STE, qjax.Estimator.CLIPPED_STE)


def _attention_rule(out: Problems, q: QuantConfig) -> qjax.nn.Rule | None:
    """The ``kind='attention'`` rule of ``quant.attention`` (``None`` when it is null or refused:
    the refusal goes to ``out`` under ``quant.attention``, or ``quant.attention.<field>`` when the
    spec's error names its field)."""
    ok, spec = _parse_spec(out, "quant.attention", q.attention, q.rounding_seed)
    if not ok or spec is None:
        return None
    estimator = q.activation_estimator if q.activation_estimator in ATTENTION_ESTIMATORS else "ste"
    try:
        gradients = None if q.gradients is None else qjax.nn.GradientSpec.from_dict(q.gradients)
    except (ValueError, TypeError):
        return None  # reported under quant.gradients by the layer rules
    try:
        return qjax.nn.Rule(
            path=".*", kind="attention", activations=spec, activation_estimator=estimator, gradients=gradients
        )
    except (ValueError, TypeError) as e:
        out.append(("quant.attention", str(e).replace("Rule '.*': ", "")))
        return None


def _adaround(out: Problems, cfg: ExperimentConfig) -> qjax.methods.AdaRoundConfig | None:
    m = cfg.method
    if m.rounding != LearnedRounding.ADAROUND:
        return None
    try:
        return qjax.methods.AdaRoundConfig(
            iterations=m.adaround_iterations, samples=m.adaround_samples, lr=m.adaround_lr
        )
    except qjax.SpecError as e:
        out.append((f"method.adaround_{e.field}", str(e)))
        return None


def _check_tracking(out: Problems, cfg: ExperimentConfig) -> None:
    """``log_every`` is a step count, and every writer turned on has its package installed."""
    _at_least(out, "tracking.log_every", cfg.tracking.log_every, 0, "0 means: no per-step metrics")
    out += tracking.missing_packages(cfg.tracking)


def with_recipe(out: Problems, q: QuantConfig) -> QuantConfig:
    """``quant`` with its ``recipe`` filled in (:func:`qjax.nn.training_recipe_fields`): the
    recipe's weights, activations and gradients under the fields the config gives, key by key,
    and its ``amax_history`` where the config leaves 0. An unknown recipe goes to ``out``."""
    if q.recipe is None:
        return q
    _at_least(out, "quant.recipe_block_size", q.recipe_block_size, 1, "e.g. 128")
    try:
        fields = qjax.nn.training_recipe_fields(
            q.recipe, block_size=max(q.recipe_block_size, 1), amax_history=q.amax_history or 16
        )
    except qjax.SpecError as e:
        out.append(("quant.recipe", str(e)))
        return q
    merged = lambda name: {**fields[name], **(getattr(q, name) or {})}
    return dataclasses.replace(
        q,
        weights=merged("weights"),
        activations=merged("activations"),
        gradients=merged("gradients"),
        amax_history=q.amax_history or fields["amax_history"],
    )


def make_plan(cfg: ExperimentConfig, axis_names: Sequence[str] = ()) -> tuple[Plan | None, Problems]:
    """The :class:`Plan` of one typed config and its value problems as ``(dotted path, message)``
    pairs; the plan is ``None`` when there is a problem."""
    out: Problems = []
    cfg = dataclasses.replace(cfg, quant=with_recipe(out, cfg.quant))
    _check_identity(out, cfg)
    _check_task(out, cfg)
    _check_sections(out, cfg, axis_names)
    _check_tracking(out, cfg)
    specs = _quant_specs(out, cfg.quant, cfg.method.name)
    rules = [] if specs is None else _rules(out, cfg.quant, specs)
    attention = _attention_rule(out, cfg.quant)
    if attention is not None and rules:  # before the catch-all layer rule, the plan's default_rule
        rules.insert(len(rules) - 1, attention)
    adaround = _adaround(out, cfg) if not out else None
    return (None, out) if out else (Plan(rules=tuple(rules), adaround=adaround), out)


def looks_like_config_path(dotted: str) -> bool:
    """``section.key`` with a known section: a misspelt config key rather than an axis name."""
    return "." in dotted and dotted.split(".")[0] in hints(ExperimentConfig)


def unknown_path(dotted: str) -> str:
    """The unknown-key message (with a suggestion) for a dotted path that is not a config key."""
    tp: Any = ExperimentConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = _fields_of(tp)
        if part not in fields:
            return unknown_key(".".join(parts[:i]), part, list(fields))
        tp = _strip_none(fields[part])
    return "a config key"
