"""One cell of a sweep: float model -> method (float / PTQ / QAT) -> metrics and protocol.

The float model of a (task, train, seed) triple is trained once per output directory, under
``<output_dir>/float-models/seed<seed>-<hash>/``, and shared by every cell of every sweep there
that needs it (trained by one process while the others wait: ``experiments.sweep.claims``); cells
keep their own QAT checkpoints under ``cells/<slug>/ckpt``. Both resume from their last checkpoint
when a run was killed. A cell writes ``config.yaml`` (resolved), ``metrics.json`` and ``log.txt`` in its
directory, and its training metrics (``metrics.jsonl``, ``tb/``: :mod:`experiments.sweep.tracking`;
the float model's rows come from ``float-models/<name>.metrics.jsonl``); the sweep adds its record to
``results.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import numpy as np

import qjax
from experiments import records
from experiments.sweep import claims, energy, hosts, llm_methods, tracking
from experiments.sweep import config as config_lib
from experiments.sweep.placement import Placement, devices_of
from experiments.sweep.plan import Plan
from experiments.sweep.qat import fine_tune, monitor, quantization_aware
from experiments.sweep.schema import ExperimentConfig, Method
from experiments.sweep.train_loop import total_steps, train, train_section_tx
from experiments.tasks import batchnorm_pairs, get_task
from experiments.tasks.base import Task, evaluate
from qjax import methods
from qjax.methods import mixed_precision

logger = logging.getLogger("qjax.experiments")


class NonFiniteMetrics(ValueError):
    """A cell's evaluation gave NaN or Inf: it is recorded ``failed``, never ``ok``."""


def load_task(cfg: ExperimentConfig) -> Task:
    """The task of ``cfg`` (with ``task.train_limit`` applied)."""
    return get_task(cfg.task)


def quantize(cfg: ExperimentConfig, model: nnx.Module, rules: Sequence[qjax.nn.Rule]) -> nnx.Module:
    """``qjax.nn.quantize_model`` with ``rules`` (the plan's, or mixed precision's); unused-rule
    warnings go to the log. A rule of ``kind='attention'`` (``quant.attention``) that reaches no
    attention layer is refused: the model has none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", qjax.nn.UnusedRuleWarning)
        qmodel = qjax.nn.quantize_model(model, rules, seed=cfg.quant.rounding_seed or 0)
    attention = [r for r in rules if r.kind == qjax.nn.RuleKind.ATTENTION and not r.is_exclusion]
    if attention and not qjax.nn.attention_ops(qmodel):
        raise ValueError(
            f"quant.attention: model {cfg.task.model!r} of task {cfg.task.name!r} has no attention layer "
            "(an nnx.MultiHeadAttention or a module with an attention_fn: qjax.nn.attention); remove "
            "quant.attention for it"
        )
    for w in caught:
        if "path='.*'" not in str(w.message):  # the catch-all rule may legitimately match nothing
            logger.warning("%s", w.message)
    return qmodel


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def float_model_dir(cfg: ExperimentConfig, sweep_dir: pathlib.Path) -> pathlib.Path:
    """Where the float model of ``cfg``'s (task, train, seed) is trained and checkpointed: shared
    by every cell of every sweep under the same output directory that needs it."""
    task_key = {k: v for k, v in dataclasses.asdict(cfg.task).items() if k != "data_args" or v}
    key = _hash({"task": task_key, "train": dataclasses.asdict(cfg.train), "seed": cfg.seed})
    return sweep_dir.parent / "float-models" / f"seed{cfg.seed}-{key[:12]}"


def float_metrics_path(cfg: ExperimentConfig, sweep_dir: pathlib.Path) -> pathlib.Path:
    """The training metrics of the float model of ``cfg`` (beside its checkpoints): every cell
    that uses it copies them (:class:`experiments.sweep.tracking.Tracker`)."""
    directory = float_model_dir(cfg, sweep_dir)
    return directory.with_name(directory.name + ".metrics.jsonl")


def float_model(
    cfg: ExperimentConfig,
    task: Task,
    sweep_dir: pathlib.Path,
    observer: tracking.TrainObserver | None,
    placement: Placement | None = None,
) -> nnx.Module:
    """The trained float model of ``cfg``'s (task, train, seed): trained once, then restored; a
    pretrained task's model is loaded as it is. Placed as ``placement`` says. Its training
    metrics go to :func:`float_metrics_path` (whoever trains it) and to ``observer``."""
    place = placement or Placement()
    if task.pretrained:
        return place.model(task.make_model(cfg.task.model, dict(cfg.task.model_args), cfg.seed))
    t = cfg.train
    model = task.make_model(cfg.task.model, dict(cfg.task.model_args), cfg.seed)
    steps = total_steps(t.epochs, t.steps, len(task.train), t.batch_size)
    tx, schedule = train_section_tx(t, steps)
    checkpoint_dir = float_model_dir(cfg, sweep_dir)
    history = tracking.History(float_metrics_path(cfg, sweep_dir)) if cfg.tracking.log_every else None
    observers = tracking.Observers(history, observer)
    # one process trains it; the others wait here, then restore its final checkpoint
    with claims.exclusive(checkpoint_dir.with_name(checkpoint_dir.name + ".lock"), "the float model"):
        return train(
            task,
            model,
            tx,
            steps=steps,
            batch_size=t.batch_size,
            seed=cfg.seed,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=t.checkpoint_every,
            keep=t.keep_checkpoints,
            placement=place,
            monitor=monitor(cfg, tracking.FLOAT, schedule, observers),
        )


def export_and_reload(
    cfg: ExperimentConfig, task: Task, model: nnx.Module, directory: pathlib.Path
) -> dict[str, float]:
    """Save the converted ``model`` with orbax (packed integer kernels, scales, static activation
    parameters), restore it into an abstract copy of its structure (no values), evaluate the
    restored model: ``export_<metric>`` and ``export_bytes`` (on disk, orbax metadata included)."""
    converted = qjax.nn.set_kernels(qjax.nn.convert(model), cfg.eval.kernels)
    with qjax.training.TrainingCheckpointer(directory, save_every=1, keep=1) as ckpt:
        ckpt.save(0, converted)
        ckpt.wait_until_finished()
        size = ckpt.step_bytes(0)
        restored = nnx.eval_shape(lambda: nnx.clone(converted))
        ckpt.restore(restored, step=0)
    restored.eval()
    metrics = evaluate(task, restored, cfg.eval.batch_size, cfg.eval.limit)
    return {**{f"export_{k}": v for k, v in metrics.items()}, "export_bytes": float(size)}


def calibration_batches(
    cfg: ExperimentConfig, task: Task, placement: Placement | None = None
) -> list[jax.Array]:
    """``calibration.batches`` batches of training inputs, drawn with the cell's seed (placed as
    ``placement`` says)."""
    c = cfg.calibration
    place = placement or Placement()
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(task.train))
    size = min(c.batch_size, len(task.train))
    return [place.take(task.train, order[i * size : (i + 1) * size])[0] for i in range(c.batches)]


def calibration_description(cfg: ExperimentConfig, task: Task) -> str:
    size = min(cfg.calibration.batch_size, len(task.train))
    return f"{cfg.calibration.batches} batches x {size} training examples, permutation seed [{cfg.seed}, 7]"


def prepare_base(cfg: ExperimentConfig, task: Task, model: nnx.Module) -> nnx.Module:
    """The model the quantizers see: batch norms folded when asked and the task names the pairs;
    an LLM rotated when ``method.rotation`` says so (a new model: the float one is left as it is)."""
    if cfg.method.rotation is not None:
        model = llm_methods.rotate(cfg.method, model)
    pairs = batchnorm_pairs(cfg.task.name, cfg.task.model) if cfg.method.fold_batchnorm else []
    return qjax.nn.fold_batchnorm(model, pairs) if pairs else model


def mixed_precision_rules(
    cfg: ExperimentConfig, plan: Plan, task: Task, base: nnx.Module, calib: list[jax.Array]
) -> tuple[list[qjax.nn.Rule], dict[str, Any]]:
    """Per-layer widths from a sensitivity scan meeting ``method.bit_budget`` (weights)."""
    m = cfg.method
    template = plan.default_rule
    lower = cfg.report.metric in ("loss", "perplexity")
    metric = cfg.report.metric if cfg.report.metric in ("loss", "perplexity", "accuracy") else "accuracy"

    def score(model: nnx.Module) -> float:
        return evaluate(task, model, cfg.eval.batch_size, m.sensitivity_examples)[metric]

    table = mixed_precision.sensitivity_scan(
        base,
        score,
        template=template,
        bits=m.candidate_bits,
        lower_is_better=lower,
        calibration_batches=calib,
    )
    allocation = mixed_precision.allocate_bits(table, m.bit_budget or 0.0)
    logger.info("mixed precision: %s (average %.3f bits)", allocation.bits, allocation.average_bits)
    info = {"allocation": dict(allocation.bits), "average_bits": allocation.average_bits, "scan": table}
    return [*plan.attention_rules, *mixed_precision.rules(allocation, template)], info


def apply_method(
    cfg: ExperimentConfig,
    plan: Plan,
    task: Task,
    base: nnx.Module,
    cell_dir: pathlib.Path,
    observer: tracking.TrainObserver | None,
    placement: Placement | None = None,
    metrics: dict[str, float] | None = None,
) -> nnx.Module:
    """PTQ: quantize, calibrate (and bias-correct); QAT: then fine-tune, resumably (from the
    model of the LLM method where one is set; with ``eval.before_qat`` the PTQ model's metrics go to
    ``metrics`` as ``ptq_<name>``); finetune: the float model trained as QAT would be, without
    quantizers (QAT's control for the extra training). The quantized model (its quantizer state
    included) is placed as ``placement`` says."""
    m = cfg.method
    place = placement or Placement()
    if m.name == Method.FINETUNE:
        return fine_tune(cfg, task, nnx.clone(base), cell_dir, observer, place)
    calib = calibration_batches(cfg, task, place)
    if m.name == Method.LLM_INT8 or m.smoothquant_alpha is not None or m.awq or m.gptq:
        info: dict[str, Any] = {}
        qmodel = llm_methods.apply_llm_method(
            cfg, base, calib, plan.rules, lambda model, rules: quantize(cfg, model, rules), info
        )
        records.write_json(cell_dir / "llm_method.json", info)
        if m.name != Method.LLM_INT8:
            qjax.nn.calibrate(qmodel, calib)
        return quantization_aware(cfg, task, qmodel, base, cell_dir, observer, place, metrics)
    rules: Sequence[qjax.nn.Rule] = plan.rules
    if m.bit_budget is not None:
        rules, info = mixed_precision_rules(cfg, plan, task, base, calib)
        records.write_json(cell_dir / "mixed_precision.json", info)
    qmodel = place.model(quantize(cfg, base, rules))
    qjax.nn.calibrate(qmodel, calib)
    if plan.adaround is not None:
        layers: list[methods.LayerReport] = []
        qmodel = methods.adaround(qmodel, base, calib, config=plan.adaround, report=layers)
        records.write_json(cell_dir / "adaround.json", [dataclasses.asdict(r) for r in layers])
    if m.bias_correction:
        qmodel = qjax.nn.bias_correction(qmodel, base, calib)
    return quantization_aware(cfg, task, qmodel, base, cell_dir, observer, place, metrics)


@contextlib.contextmanager
def cell_log(path: pathlib.Path) -> Iterator[None]:
    """Route the ``qjax`` loggers to the cell's ``log.txt`` while the cell runs (process 0's, with
    several processes)."""
    if not records.writes():  # several processes: process 0 keeps the log
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("qjax")
    root.addHandler(handler)
    level, propagate = root.level, root.propagate
    root.setLevel(logging.INFO)
    root.propagate = False  # the cell's progress goes to its log, not the console
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        root.propagate = propagate
        handler.close()


def diagnose(task: Task, model: nnx.Module, base: nnx.Module) -> list[dict[str, Any]]:
    """The per-layer diagnostics of ``model`` against ``base`` on the task's first test examples
    (``task.diagnostic_examples`` of them, cut to ``task.diagnostic_length`` positions if set)."""
    probe = task.test.take(np.arange(min(task.diagnostic_examples, len(task.test))))[0]
    if task.diagnostic_length > 0:
        probe = probe[:, : task.diagnostic_length]
    return qjax.nn.layer_diagnostics(model, base, probe)


def cell_tracker(cell: config_lib.Cell, sweep_dir: pathlib.Path) -> tracking.Tracker:
    """The :class:`~experiments.sweep.tracking.Tracker` of ``cell`` (its float phase copied from
    :func:`float_metrics_path`)."""
    cfg = cell.config
    return tracking.Tracker(
        sweep_dir / "cells" / cell.slug,
        cfg.tracking,
        sweep_dir=sweep_dir,
        name=cell.label,
        run_config=config_lib.to_dict(cfg),
        sources={tracking.FLOAT: float_metrics_path(cfg, sweep_dir)},
    )


def gradient_sqnr(
    cfg: ExperimentConfig, plan: Plan, task: Task, model: nnx.Module, placement: Placement
) -> dict[str, float | None]:
    """QAT with quantized backward passes: each such layer's kernel-gradient SQNR against a float
    backward pass (:func:`qjax.nn.gradient_sqnr`) on the first training batch, after training
    (``{}`` for other cells). ``None`` where it is not finite (an exact gradient: ``inf``; a
    zero reference: ``-inf``), so that the record stays JSON and its mean is over finite layers."""
    if cfg.method.name != Method.QAT or not any(r.gradients for r in plan.rules):
        return {}
    batch = placement.take(task.train, np.arange(min(cfg.train.batch_size, len(task.train))))
    sqnr = qjax.nn.gradient_sqnr(model, task.loss, batch)
    return {k: (v if math.isfinite(v) else None) for k, v in sqnr.items()}


def initial_model(cfg: ExperimentConfig, task: Task, placement: Placement) -> nnx.Module:
    """The untrained model of ``cfg`` (``method.from_scratch``), placed."""
    if task.pretrained:
        raise ValueError(
            f"method.from_scratch: the {task.name!r} task's model comes trained; set "
            "method.from_scratch: false"
        )
    model = task.make_model(cfg.task.model, dict(cfg.task.model_args), cfg.seed)
    model.eval()  # as a trained float model is: calibration leaves batch-norm statistics alone
    return placement.model(model)


def run_cell(
    cell: config_lib.Cell,
    sweep_dir: pathlib.Path,
    env: dict[str, Any],
    observer: tracking.TrainObserver | None = None,
) -> dict[str, Any]:
    """Run one cell and return its results record (also written to ``metrics.json``); its training
    phases report to its tracker and to ``observer`` (a progress display)."""
    cfg = cell.config
    cell_dir = sweep_dir / "cells" / cell.slug
    records.write_atomic(cell_dir / "config.yaml", config_lib.dump_yaml(cfg))
    start = time.time()
    with cell_log(cell_dir / "log.txt"), cell_tracker(cell, sweep_dir) as tracker:
        observers = tracking.Observers(tracker, observer)
        logger.info(
            "cell %s (%s) in process %d on %s", cell.label, cell.hash, os.getpid(), socket.gethostname()
        )
        placement = Placement.of(cfg.mesh.data, cfg.mesh.fsdp)
        task = load_task(cfg)
        model = (
            initial_model(cfg, task, placement)
            if cfg.method.from_scratch
            else float_model(cfg, task, sweep_dir, observers, placement)
        )
        base = model
        before: dict[str, float] = {}
        if cfg.method.name != Method.FLOAT:
            base = prepare_base(cfg, task, model)
            model = apply_method(cfg, cell.plan, task, base, cell_dir, observers, placement, before)
        gradients = gradient_sqnr(cfg, cell.plan, task, model, placement)
        finite = [v for v in gradients.values() if v is not None]
        if finite:
            before["grad_sqnr_db"] = float(np.mean(finite))
        model.eval()
        metrics = evaluate(task, model, cfg.eval.batch_size, cfg.eval.limit, placement.take)
        metrics.update(before)
        held_by = devices_of(nnx.state(model))
        for node in (base, model):  # several processes: each reads the values from here on
            placement.replicate_across_processes(node)
        if cfg.eval.serve and cfg.method.name.quantizes:
            served = qjax.nn.set_kernels(qjax.nn.convert(model), cfg.eval.kernels)
            if qjax.kernels.resolved_kernel_path(cfg.eval.kernels) != "xla":
                qjax.nn.prepare_kernels(served)  # W4A16 layers: pack for the kernel once, not per batch
            metrics.update(
                {
                    f"serve_{k}": v
                    for k, v in evaluate(
                        task, served, cfg.eval.batch_size, cfg.eval.limit, placement.take
                    ).items()
                }
            )
        if cfg.eval.export and cfg.method.name.quantizes:
            metrics.update(export_and_reload(cfg, task, model, cell_dir / "export"))
        example = task.test.take(np.arange(1))[0]
        storage = {k: v for k, v in energy.model_storage(model).items() if k != "params"}
        model_info = {**storage, **energy.forward_energy(model, example)}
        layers = diagnose(task, model, base) if cfg.method.name.quantizes and cfg.eval.diagnostics else []
        logger.info("metrics %s", metrics)
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            raise NonFiniteMetrics(
                f"non-finite metrics {bad}: the model's outputs overflow or are NaN (a diverged or "
                "broken model; see the layer diagnostics of a run with eval.diagnostics=true)"
            )
    record = {
        "cell": cell.label,
        "hash": cell.hash,
        "axes": cell.axes,
        "status": "ok",
        "error": None,
        "metrics": metrics,
        "model": model_info,
        "layers": layers,
        "gradient_sqnr_db": gradients,
        "protocol": {
            **env,
            "device": held_by,
            "mesh": placement.describe(),
            "config_hash": cell.hash,
            "seed": cfg.seed,
            "dataset": task.description,
            "dataset_sha256": task.checksum,
            "calibration": calibration_description(cfg, task),
            "wall_time_s": round(time.time() - start, 2),
        },
        "config": config_lib.to_dict(cfg),
        "run_dir": str(cell_dir.relative_to(sweep_dir)),
    }
    records.write_json(cell_dir / "metrics.json", record)
    return record


def failure_record(cell: config_lib.Cell, sweep_dir: pathlib.Path, error: BaseException) -> dict[str, Any]:
    return {
        "cell": cell.label,
        "hash": cell.hash,
        "axes": cell.axes,
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "metrics": {},
        "model": {},
        "layers": [],
        "protocol": {"config_hash": cell.hash, "seed": cell.config.seed},
        "config": config_lib.to_dict(cell.config),
        "run_dir": str((sweep_dir / "cells" / cell.slug).relative_to(sweep_dir)),
    }


def finished_record(cell: config_lib.Cell, sweep_dir: pathlib.Path) -> dict[str, Any] | None:
    """The record a finished run of ``cell`` left in its ``metrics.json`` (written only when the
    cell ends ``ok``), or ``None``: lets a later process add a record whose writer died first."""
    path = sweep_dir / "cells" / cell.slug / "metrics.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("status") == "ok" and record.get("hash") == cell.hash
    return record if ok else None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What :func:`run_claimed` did with a cell: ``busy`` (another process holds it), ``settled``
    (another process finished it: ``record`` is its record in ``results.jsonl``), ``recovered`` (a
    finished run's ``metrics.json`` had no record yet), ``ran`` (``record``: ok or failed)."""

    status: str
    record: dict[str, Any] | None = None


_DECISIONS = ("settled", "recovered", "ran")


def run_claimed(
    cell: config_lib.Cell,
    sweep_dir: pathlib.Path,
    env: dict[str, Any],
    before: dict[str, Any] | None,
    *,
    wait: bool,
    write: bool,
    fail_fast: bool = False,
    observer: tracking.TrainObserver | None = None,
) -> Outcome:
    """Run ``cell`` if this process can claim it (``experiments.sweep.claims``) and nobody finished
    it since ``before`` (its record when the sweep started); a failing cell gives a failed record
    unless ``fail_fast``. With ``write``, the record is added to ``results.jsonl`` before the claim
    is released (else the caller adds it). With several processes (``experiments.sweep.hosts``)
    process 0 claims and decides for all, and a failure stops every process."""
    several = hosts.several()
    with claims.claim(claims.cell_claim_path(sweep_dir, cell.slug), wait=wait or several) as held:
        if not held:
            return Outcome("busy")
        now = {r.get("cell"): r for r in records.read_results(sweep_dir)}.get(cell.label)
        settled = claims.settled_elsewhere(cell.hash, before, now)
        record = None if settled else finished_record(cell, sweep_dir)
        mine = "settled" if settled else "recovered" if record is not None else "ran"
        status = _DECISIONS[hosts.agree(_DECISIONS.index(mine))]  # several processes: process 0's
        if status == "settled":
            return Outcome("settled", now)
        if status == "ran":
            try:
                record = run_cell(cell, sweep_dir, env, observer=observer)
            except Exception as e:  # a failing cell is recorded; the sweep goes on
                if several:
                    hosts.stop_everywhere(cell.label, e)
                if fail_fast:
                    raise
                logger.exception("cell %s failed", cell.label)
                record = failure_record(cell, sweep_dir, e)
        if write and record is not None:
            records.upsert_result(sweep_dir, record)
        return Outcome(status, record)
