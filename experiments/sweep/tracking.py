"""Per-step training metrics of a cell: ``metrics.jsonl``, TensorBoard, Weights & Biases, MLflow.

**What.** Every training phase of a cell (``float``: the float model's training; ``qat`` or
``finetune``: the method's) logs, on every ``tracking.log_every``-th step and on its last step,
one row (:func:`experiments.sweep.train_loop.train` computes it):

* ``loss``: the training loss of that step's batch; ``grad_norm``: the global L2 norm of the
  gradients that step applied (returned by the train step itself:
  ``qjax.training.make_train_step(return_grad_norm=True)``, no second pass);
* ``lr``: the learning rate that step's update used, the optax schedule at ``step - 1`` (the
  optimizer's count before the update);
* ``quantizer/<layer path>/<name>`` (quantized models, :func:`quantizer_statistics`): the learned
  ``weight_scale`` (LSQ), ``act_scale`` / ``act_offset`` (LSQ, LSQ+) and ``act_clip`` (PACT), each
  the mean over its blocks, and ``weight_clip_fraction``: the fraction of kernel elements the
  weight quantizer clips at that step (rounded code outside the grid, with its learned, pinned or
  calibrated parameters).

Values are read from the device on logged steps only (one ``jax.device_get`` of a few scalars), so
the steps in between run without a host sync.

**Where.** ``cells/<slug>/metrics.jsonl``: one strict-JSON object per logged step,
``{"phase": ..., "step": ..., "loss": ..., "lr": ..., "grad_norm": ..., "quantizer/...": ...}``
(non-finite values as ``null``). ``cells/<slug>/tb/<phase>/``: TensorBoard event files (tensorboardX)
with the scalars ``<phase>/<name>``; ``tensorboard --logdir SWEEP_DIR`` shows every cell. With
``tracking.wandb``, a Weights & Biases run per cell in offline mode under ``cells/<slug>/wandb/``
(``wandb sync`` uploads it); with ``tracking.mlflow``, an MLflow run per cell in the file store
``SWEEP_DIR/mlruns`` (``mlflow ui --backend-store-uri SWEEP_DIR/mlruns``). In a run of several
processes, process 0 alone writes (every process computes the values: they come from collectives).

**Resume.** A phase resumed from its checkpoint at step ``s`` first drops the rows after ``s`` (the
killed run logged them, the resumed run logs them again), so no step is lost or counted twice; its
TensorBoard writer starts with ``purge_step=1``, which makes TensorBoard drop the killed run's
events, and writes the rows up to ``s`` again. W&B and MLflow get one run per attempt, holding the
rows up to ``s`` again and then the new ones. The float model is shared by every cell that needs it
(``experiments.sweep.runner``): its rows are kept beside its checkpoints
(``float-models/<name>.metrics.jsonl``, by whoever trains it) and copied into the files and runs of
every cell that uses it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol

import flax.nnx as nnx
import jax
import jax.numpy as jnp

import qjax
from experiments import records
from experiments.sweep.schema import TrackingConfig
from qjax.numerics.formats import CodebookFormat, QParams
from qjax.numerics.quantize import clipped_by_nearest

logger = logging.getLogger("qjax.experiments")

METRICS = "metrics.jsonl"
FLOAT = "float"
LEARNED = ("weight_scale", "act_scale", "act_offset", "act_clip")
# config key -> (module, what to install)
PACKAGES = {
    "tensorboard": ("tensorboardX", "tensorboardX"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


@functools.cache
def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_packages(config: TrackingConfig) -> list[tuple[str, str]]:
    """``(tracking.<key>, problem)`` for every writer ``config`` turns on whose package is missing."""
    out = []
    for key, (module, package) in PACKAGES.items():
        if getattr(config, key) and not installed(module):
            out.append(
                (
                    f"tracking.{key}",
                    f"true, but {module} is not installed: pip install {package} (or pip install "
                    f"'qjax[tracking]'), or set tracking.{key}=false",
                )
            )
    return out


# -- what a training loop tells its observers ------------------------------------------------------


class TrainObserver(Protocol):
    """What :func:`experiments.sweep.train_loop.train` reports of a phase: where it starts (after
    restoring a checkpoint: ``step`` of ``steps`` done), every step (no device values: no sync), and
    the metrics of every logged step (host floats)."""

    def begin(self, phase: str, step: int, steps: int) -> None: ...

    def advance(self, phase: str, step: int) -> None: ...

    def log(self, phase: str, step: int, metrics: Mapping[str, float]) -> None: ...


class Observers:
    """Several observers as one, told in order (``None`` entries left out)."""

    def __init__(self, *observers: TrainObserver | None):
        self.observers = [o for o in observers if o is not None]

    def begin(self, phase: str, step: int, steps: int) -> None:
        for o in self.observers:
            o.begin(phase, step, steps)

    def advance(self, phase: str, step: int) -> None:
        for o in self.observers:
            o.advance(phase, step)

    def log(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        for o in self.observers:
            o.log(phase, step, metrics)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Monitor:
    """How :func:`~experiments.sweep.train_loop.train` reports one phase: to ``observer``, with the
    learning rate of the update at optimizer count ``t`` from ``learning_rate(t)`` (the optax
    schedule), metrics on every ``log_every``-th step and the last (``0``: no metrics)."""

    phase: str
    observer: TrainObserver
    learning_rate: Callable[[int], Any]
    log_every: int = 10

    def logs(self, step: int, steps: int) -> bool:
        return self.log_every > 0 and (step == steps or step % self.log_every == 0)


# -- quantizer statistics --------------------------------------------------------------------------


def weight_clip_fraction(layer: nnx.Module, op: Any) -> jax.Array | None:
    """The fraction of ``layer``'s kernel elements that its weight quantizer clips
    (``qjax.numerics.quantize.clipped_by_nearest``: the rounded code outside the grid, with its
    learned LSQ scale, its pinned parameters, or its parameters calibrated from the kernel as the
    forward pass does); ``None`` for float kernels, codebooks and converted layers."""
    spec = op.rule.weights
    if spec is None or getattr(op, "centroids", None) is not None or isinstance(spec.format, CodebookFormat):
        return None
    kernel = getattr(layer, qjax.nn.layer_hook(layer).kernel)[...]
    if isinstance(kernel, qjax.QArray):
        return None
    x = jnp.asarray(kernel, jnp.float32)
    scale = getattr(op, "weight_scale", None)
    pinned = op.weight_qparams() if isinstance(op, qjax.nn.QuantizedContraction) else None
    qp = QParams(scale[...]) if scale is not None else pinned or qjax.calibrate(x, spec)
    return jnp.mean(clipped_by_nearest(x, spec, qp).astype(jnp.float32))


def quantizer_statistics(model: nnx.Module) -> dict[str, jax.Array]:
    """``quantizer/<path>/<name>`` -> a device scalar for every quantized layer: the mean of each
    learned quantizer parameter (:data:`LEARNED`, from ``qjax.nn.learned_quantizer_params``) and
    the :func:`weight_clip_fraction`. Jit it with ``nnx.jit``; empty for a float model."""
    out = {}
    for path, params in qjax.nn.learned_quantizer_params(model).items():
        for name, value in params.items():
            if name in LEARNED:
                out[f"quantizer/{path}/{name}"] = jnp.mean(jnp.asarray(value, jnp.float32))
    for path, layer, op in qjax.nn.quantized_ops(model):
        fraction = weight_clip_fraction(layer, op)
        if fraction is not None:
            out[f"quantizer/{path}/weight_clip_fraction"] = fraction
    return out


# -- metrics.jsonl ---------------------------------------------------------------------------------


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (none if it does not exist); a line that is not a row with a
    ``phase`` and a ``step`` (the torn last line of a killed run) is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("phase"), str) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of a row (``phase``, ``step`` and ``null`` values left out)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in ("phase", "step") and isinstance(v, int | float) and not isinstance(v, bool)
    }


class MetricsFile:
    """A ``metrics.jsonl``: rows appended as they come (flushed, not synced: a kill loses at most
    the last row, which the resumed run logs again); rewritten atomically when a phase resumes.
    Written by process 0 only."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def replace_phase(self, phase: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Make ``rows`` the rows of ``phase`` (in place of its old ones; at the end if it had none)."""
        old = self.rows()
        at = next((i for i, r in enumerate(old) if r["phase"] == phase), len(old))
        others = [r for r in old if r["phase"] != phase]
        new = [*others[:at], *rows, *others[at:]]
        if new != old:
            records.write_atomic(self.path, "".join(records.to_json(r) + "\n" for r in new))

    def append(self, row: Mapping[str, Any]) -> None:
        if not records.writes():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(records.to_json(row) + "\n")


def phase_rows(rows: Iterable[Mapping[str, Any]], phase: str, until: int) -> list[dict[str, Any]]:
    """The rows of ``phase`` up to step ``until``, one per step (the last one written wins)."""
    by_step = {int(r["step"]): dict(r) for r in rows if r["phase"] == phase and r["step"] <= until}
    return [by_step[s] for s in sorted(by_step)]


class History:
    """The rows of a phase kept in one file by whoever trains it (the float model's, beside its
    checkpoints): on resume at ``step`` the rows after it are dropped."""

    def __init__(self, path: pathlib.Path):
        self.file = MetricsFile(path)

    def begin(self, phase: str, step: int, steps: int) -> None:
        if records.writes():
            self.file.replace_phase(phase, phase_rows(self.file.rows(), phase, step))

    def advance(self, phase: str, step: int) -> None:
        pass

    def log(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        self.file.append({"phase": phase, "step": step, **metrics})


# -- writers ---------------------------------------------------------------------------------------


class TensorBoard:
    """Event files under ``<root>/<phase>/``, one TensorBoard run per phase. A phase that begins
    where event files exist (a resumed run) gets a writer with ``purge_step=1``: TensorBoard drops
    every earlier event of that run, and the phase's rows up to the resumed step are written again
    from ``metrics.jsonl``. So the events are the file's rows, whatever a killed run had flushed
    (the writer flushes every 30 s and when it closes, not per row)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.writers: dict[str, Any] = {}

    def begin(self, phase: str, step: int, replay: Sequence[Mapping[str, Any]]) -> None:
        from tensorboardX import SummaryWriter

        if phase in self.writers:
            self.writers.pop(phase).close()
        directory = self.root / phase
        earlier = directory.is_dir() and any(directory.iterdir())
        # a file name per writer, in time order: two writers in one second would share tensorboardX's
        self.writers[phase] = SummaryWriter(
            str(directory),
            purge_step=1 if earlier else None,
            flush_secs=30,
            filename_suffix=f".{time.time_ns()}",
        )
        for row in replay:
            self.write(phase, int(row["step"]), row_metrics(row))

    def write(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        writer = self.writers[phase]
        for name, value in metrics.items():
            writer.add_scalar(f"{phase}/{name}", value, step)

    def close(self, failed: bool) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


class Wandb:
    """A Weights & Biases run in offline mode under ``directory`` (``wandb sync`` uploads it); each
    phase's scalars are plotted against their own step, ``<phase>/step``."""

    def __init__(self, directory: pathlib.Path, project: str, name: str, config: Mapping[str, Any]):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
        self.run = wandb.init(
            mode="offline",
            dir=str(directory),
            project=project,
            name=name,
            config=dict(config),
            reinit="create_new",
            settings=settings,
        )

    def begin(self, phase: str, step: int, replay: Sequence[Mapping[str, Any]]) -> None:
        self.run.define_metric(f"{phase}/step")
        self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
        for row in replay:
            self.write(phase, int(row["step"]), row_metrics(row))

    def write(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({f"{phase}/step": step, **{f"{phase}/{k}": v for k, v in metrics.items()}})

    def close(self, failed: bool) -> None:
        import wandb

        self.run.finish(exit_code=1 if failed else 0)
        # finish() may return before wandb's service has written an offline run's records; teardown
        # waits for it (and stops it: the next cell's run starts a new one, about a second)
        wandb.teardown()


_MLFLOW_KEY = re.compile(r"[^\w\-. /]")


class Mlflow:
    """An MLflow run in the tracking store ``uri`` (a local ``file:`` store by default), experiment
    ``project``, through ``MlflowClient`` (no global active run)."""

    def __init__(self, uri: str, project: str, name: str, config: Mapping[str, Any], lock: pathlib.Path):
        if uri.startswith("file:"):  # MLflow 3 asks file stores to opt in; a local file store is wanted here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        with records.file_lock(lock):  # processes sharing the sweep create the experiment once
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def begin(self, phase: str, step: int, replay: Sequence[Mapping[str, Any]]) -> None:
        for row in replay:
            self.write(phase, int(row["step"]), row_metrics(row))

    def write(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_MLFLOW_KEY.sub("_", f"{phase}/{k}"), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- the tracker of a cell -------------------------------------------------------------------------


class Tracker:
    """The metrics of one cell: ``metrics.jsonl`` always, and the writers ``config`` turns on,
    opened when the first phase begins. ``sources`` maps a phase to the file that holds its rows
    when another owner logs it (the float model's :class:`History`). A :class:`TrainObserver`; a
    context manager that closes the writers (runs marked failed when the cell raised). Does nothing
    on processes other than 0."""

    def __init__(
        self,
        cell_dir: pathlib.Path,
        config: TrackingConfig,
        *,
        sweep_dir: pathlib.Path,
        name: str,
        run_config: Mapping[str, Any],
        sources: Mapping[str, pathlib.Path] | None = None,
    ):
        self.cell_dir, self.config, self.sweep_dir = cell_dir, config, sweep_dir
        self.name, self.run_config = name, run_config
        self.file = MetricsFile(cell_dir / METRICS)
        self.sources = {k: MetricsFile(v) for k, v in (sources or {}).items()}
        self.enabled = records.writes() and config.log_every > 0
        self.writers: list[Any] | None = None

    def _open(self) -> list[Any]:
        c = self.config
        project = c.project or str(self.run_config.get("name") or self.sweep_dir.name)
        writers: list[Any] = []
        if c.tensorboard:
            writers.append(TensorBoard(self.cell_dir / "tb"))
        if c.wandb:
            writers.append(Wandb(self.cell_dir, project, self.name, self.run_config))
        if c.mlflow:
            uri = (self.sweep_dir / "mlruns").resolve().as_uri()
            writers.append(Mlflow(uri, project, self.name, self.run_config, self.sweep_dir / "mlruns.lock"))
        return writers

    def begin(self, phase: str, step: int, steps: int) -> None:
        if not self.enabled:
            return
        if self.writers is None:
            self.writers = self._open()
        mine = phase_rows(self.file.rows(), phase, step)
        source = self.sources.get(phase)
        kept = mine if source is None else phase_rows(source.rows(), phase, step)
        self.file.replace_phase(phase, kept)
        for writer in self.writers:  # each starts the phase anew with its rows so far
            writer.begin(phase, step, kept)

    def advance(self, phase: str, step: int) -> None:
        pass

    def log(self, phase: str, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self.file.append({"phase": phase, "step": step, **metrics})
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for writer in self.writers or []:
            writer.write(phase, step, finite)

    def close(self, failed: bool = False) -> None:
        writers, self.writers = self.writers or [], None
        for writer in writers:
            try:
                writer.close(failed)
            except Exception:  # a writer that cannot close must not hide the cell's result
                logger.exception("closing %s of %s failed", type(writer).__name__, self.name)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=kind is not None)
