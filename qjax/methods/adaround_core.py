"""AdaRound's math: learning, per weight, whether to round up or down onto a fixed integer grid.

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML). The grid of
a kernel :math:`W` is fixed beforehand: its scale :math:`S` and zero point :math:`Z` per block come
from the spec's calibration (the paper minimises :math:`\\|W - \\hat W\\|^2` over the scale:
``calibration='mse'``), and :math:`[q_{min}, q_{max}]` is the format's range. Only the rounding is
learned, through a continuous variable :math:`V` of :math:`W`'s shape:

.. math::

    \\tilde W(V) = S \\big(\\operatorname{clip}(\\lfloor W / S \\rfloor + h(V) + Z,\\ q_{min},\\ q_{max})
    - Z\\big), \\qquad
    h(V) = \\operatorname{clip}\\big(\\sigma(V) (\\zeta - \\gamma) + \\gamma,\\ 0,\\ 1\\big),

the rectified sigmoid with :math:`\\zeta = 1.1`, :math:`\\gamma = -0.1`. :math:`V` starts where
:math:`h(V_0) = W/S - \\lfloor W/S \\rfloor`, so that :math:`\\tilde W(V_0) = W` inside the range:
:math:`V_0 = \\sigma^{-1}\\big((f - \\gamma) / (\\zeta - \\gamma)\\big)` with :math:`f` the fractional
part. The objective of one layer is its output reconstruction plus a regulariser that drives every
:math:`h` to 0 or 1:

.. math::

    \\mathcal{L}(V) = \\big\\langle \\| f(W x) - f(\\tilde W(V) \\tilde x) \\|^2 \\big\\rangle
    + \\lambda \\sum_{ij} \\big(1 - |2 h(V_{ij}) - 1|^{\\beta}\\big),

with :math:`x` the layer's input in the float model, :math:`\\tilde x` its input in the partially
quantized model, :math:`f` the identity (pre-activation output; a nonlinearity may be given) and
:math:`\\|\\cdot\\|^2` summed over the output features (the last axis) and averaged over every other
axis (samples, and the positions of a convolution), as the reference implementation does
(``mse_loss(..., reduction='none').sum(1).mean()`` in channels-first layout).

Schedule over :math:`T` iterations with warm-up fraction :math:`w`: the regulariser is off for
:math:`t < wT`; afterwards :math:`\\beta` falls linearly from :math:`\\beta_{start}` to
:math:`\\beta_{end}`:
:math:`\\beta_t = \\beta_{end} + (\\beta_{start} - \\beta_{end})(1 - (t - wT)/(T - wT))`.
Each iteration is one Adam step on a minibatch of the cached samples (shuffled passes over them, so
a minibatch never repeats a sample). The result is rounded hard: up where :math:`h(V) \\ge 1/2`,

.. math::

    \\hat W = S \\big(\\operatorname{clip}(\\lfloor W/S \\rfloor + [h(V) \\ge \\tfrac12] + Z,\\ q_{min},
    \\ q_{max}) - Z\\big),

which lies on the grid: ``quantize_dequantize`` with the same parameters and nearest rounding gives
it back bit for bit.

Paper settings (and the defaults here): :math:`\\lambda = 0.01`, :math:`\\beta: 20 \\to 2`, 20 %
warm-up, Adam with learning rate :math:`10^{-3}`, minibatches of 32 samples, 10,000 iterations (the
default here is 2,000; fewer iterations want a larger learning rate, since Adam moves each
:math:`V` by about ``lr`` per step and :math:`h` saturates at :math:`|V| \\approx 2.4`).

Division by :math:`S` is a multiplication by :math:`\\mathrm{fl}(1/S)`, as in
:mod:`qjax.numerics.formats`, so the grid here is the one the quantizers use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax.numerics import QParams, QuantSpec, tiling
from qjax.numerics.fields import SpecError, reject_unknown_fields
from qjax.numerics.formats import IntFormat

ZETA = 1.1
GAMMA = -0.1

Apply = Callable[[jax.Array, jax.Array], jax.Array]  # (inputs, weight) -> layer outputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaRoundConfig:
    """Settings of the rounding optimisation (one per layer). A bad field raises
    :class:`~qjax.numerics.fields.SpecError` (a ``ValueError``) whose ``field`` names it.

    Attributes:
      iterations: Adam steps per layer (paper: 10,000).
      lr: Adam learning rate (paper's reference implementation: 1e-3, over 10,000 iterations; over
        2,000, 1e-2 lets the rounding settle where 1e-3 leaves many :math:`h` soft).
      lambda_: weight :math:`\\lambda` of the rounding regulariser (paper: 0.01).
      beta_start, beta_end: the regulariser's exponent :math:`\\beta`, annealed linearly after the
        warm-up (paper: 20 -> 2).
      warmup: fraction of ``iterations`` without the regulariser, in [0, 1) (paper: 0.2).
      batch_size: samples per Adam step (paper: 32); all samples when fewer are cached.
      samples: use at most this many cached samples (the first ones; ``None``: all the batches give).
      seed: seed of the minibatch draws (and of stochastic rounding of the captured inputs, if any).
    """

    iterations: int = 2000
    lr: float = 1e-3
    lambda_: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    batch_size: int = 32
    samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                least = "a non-negative int" if name == "seed" else "an int >= 1"
                raise SpecError(f"AdaRoundConfig {name}={value!r} must be {least}", field=name)
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise SpecError(
                f"AdaRoundConfig samples={self.samples!r} must be an int >= 1 or None (all)", field="samples"
            )
        if not self.lr > 0:
            raise SpecError(f"AdaRoundConfig lr={self.lr!r} must be > 0, e.g. 1e-3", field="lr")
        if not self.lambda_ >= 0:
            raise SpecError(
                f"AdaRoundConfig lambda_={self.lambda_!r} must be >= 0, e.g. 0.01", field="lambda_"
            )
        if not self.beta_start >= self.beta_end > 0:
            raise SpecError(
                f"AdaRoundConfig beta_start={self.beta_start!r}, beta_end={self.beta_end!r}: need "
                "beta_start >= beta_end > 0 (the paper anneals 20 -> 2)",
                field="beta_end" if self.beta_end <= 0 else "beta_start",
            )
        if not 0.0 <= self.warmup < 1.0:
            raise SpecError(
                f"AdaRoundConfig warmup={self.warmup!r} must be in [0, 1), e.g. 0.2", field="warmup"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdaRoundConfig:
        """From a config file's mapping (``lambda`` is accepted for ``lambda_``)."""
        d = {("lambda_" if k == "lambda" else k): v for k, v in d.items()}
        reject_unknown_fields("AdaRoundConfig", d, [f.name for f in dataclasses.fields(cls)])
        return cls(**d)


class RoundingGrid(NamedTuple):
    """A tensor on its integer grid, per element: :math:`W \\cdot \\mathrm{fl}(1/S) = ` ``base`` + ``frac``.

    ``base`` is :math:`\\lfloor W/S \\rfloor` (integer-valued float32), ``frac`` in [0, 1) the
    fractional part, ``scale`` and ``zero_point`` the block's :math:`S` and :math:`Z` repeated over
    its elements, ``qmin`` / ``qmax`` the format's range (float32 scalars).
    """

    base: jax.Array
    frac: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    qmin: jax.Array
    qmax: jax.Array


def rounding_grid(w: jax.Array, spec: QuantSpec, qparams: QParams) -> RoundingGrid:
    """The grid of ``w`` under ``spec`` with the (grid-shaped) parameters ``qparams``."""
    fmt = spec.format
    if not isinstance(fmt, IntFormat):
        raise ValueError(
            f"AdaRound rounds onto an integer grid; dtype={spec.dtype!r} is not an integer format "
            "(use int2..int8 or uint2..uint8)"
        )
    w = jnp.asarray(w, jnp.float32)
    block = tiling.block_shape(w.shape, spec)
    grid = tiling.grid_shape(w.shape, block)
    scale = jnp.broadcast_to(jnp.asarray(qparams.scale, jnp.float32), grid)
    # 1/S on the grid, then repeated: the reciprocal IntFormat.encode multiplies by.
    y = w * tiling.per_element(1.0 / scale, w.shape, block)
    base = jnp.floor(y)
    zp = qparams.zero_point
    zero = (
        jnp.zeros(w.shape, jnp.float32)
        if zp is None
        else tiling.per_element(jnp.broadcast_to(jnp.asarray(zp).astype(jnp.float32), grid), w.shape, block)
    )
    qmin, qmax = fmt.qrange(zp is None and fmt.signed)  # as IntFormat.encode
    return RoundingGrid(
        base=base,
        frac=y - base,
        scale=tiling.per_element(scale, w.shape, block),
        zero_point=zero,
        qmin=jnp.float32(qmin),
        qmax=jnp.float32(qmax),
    )


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    """:math:`h(V) = \\operatorname{clip}(\\sigma(V)(\\zeta - \\gamma) + \\gamma, 0, 1)`."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: jax.Array) -> jax.Array:
    """:math:`V` with :math:`h(V) = h` for :math:`h \\in [0, 1]`: the logit of
    :math:`(h - \\gamma) / (\\zeta - \\gamma) \\in [1/12, 11/12]` (finite everywhere)."""
    p = (jnp.asarray(h, jnp.float32) - GAMMA) * (1.0 / (ZETA - GAMMA))
    return jnp.log(p) - jnp.log1p(-p)


def init_rounding(grid: RoundingGrid) -> jax.Array:
    """:math:`V_0` with :math:`h(V_0)` = the fractional part of :math:`W/S`."""
    return inverse_rectified_sigmoid(grid.frac)


def soft_weight(v: jax.Array, grid: RoundingGrid) -> jax.Array:
    """:math:`\\tilde W(V)`, differentiable in ``v``."""
    q = jnp.clip(grid.base + rectified_sigmoid(v) + grid.zero_point, grid.qmin, grid.qmax)
    return (q - grid.zero_point) * grid.scale


def hard_values(v: jax.Array, grid: RoundingGrid) -> jax.Array:
    """The integer values :math:`q` of :math:`\\hat W` (int32): up where :math:`h(V) \\ge 1/2`."""
    up = (rectified_sigmoid(v) >= 0.5).astype(jnp.float32)
    return jnp.clip(grid.base + up + grid.zero_point, grid.qmin, grid.qmax).astype(jnp.int32)


def hard_weight(v: jax.Array, grid: RoundingGrid) -> jax.Array:
    """:math:`\\hat W = S(q - Z)`, the same float32 product as ``qjax.numerics`` decoding."""
    return (hard_values(v, grid).astype(jnp.float32) - grid.zero_point) * grid.scale


def rounding_regularizer(v: jax.Array, beta: jax.Array | float) -> jax.Array:
    """:math:`\\sum (1 - |2 h(V) - 1|^{\\beta})`: 0 when every :math:`h` is 0 or 1."""
    return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_schedule(step: jax.Array | int, config: AdaRoundConfig) -> tuple[jax.Array, jax.Array]:
    """``(beta, on)`` at iteration ``step`` (0-based): ``on`` is 0.0 during the warm-up, else 1.0;
    ``beta`` falls linearly from ``beta_start`` (first step after the warm-up) towards ``beta_end``."""
    t = jnp.asarray(step).astype(jnp.float32)
    warm = config.warmup * config.iterations
    rel = jnp.clip((t - warm) / max(config.iterations - warm, 1.0), 0.0, 1.0)
    beta = config.beta_end + (config.beta_start - config.beta_end) * (1.0 - rel)
    return beta, (t >= warm).astype(jnp.float32)


def reconstruction_error(out: jax.Array, target: jax.Array) -> jax.Array:
    """:math:`\\|\\cdot\\|^2` summed over the last axis (output features), averaged over the others."""
    diff = out.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))


def adaround_loss(
    v: jax.Array,
    grid: RoundingGrid,
    apply: Apply,
    inputs: jax.Array,
    targets: jax.Array,
    step: jax.Array | int,
    config: AdaRoundConfig,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """``(loss, (reconstruction, regulariser))`` of the module docstring at iteration ``step``.

    ``apply(inputs, weight)`` is the layer (and its nonlinearity, if any) with the kernel replaced;
    ``targets`` the float layer's outputs on the float inputs.
    """
    recon = reconstruction_error(apply(inputs, soft_weight(v, grid)), targets)
    beta, on = beta_schedule(step, config)
    reg = rounding_regularizer(v, beta)
    return recon + on * config.lambda_ * reg, (recon, reg)


def minibatches(n: int, batch: int, iterations: int, seed: int | Sequence[int]) -> np.ndarray:
    """``(iterations, batch)`` sample indices: shuffled passes over ``range(n)`` cut into minibatches
    (a minibatch never repeats a sample); drawn on the host with NumPy's generator seeded by ``seed``."""
    if not 1 <= batch <= n:
        raise ValueError(f"batch={batch} must be in [1, n={n}]")
    rng = np.random.default_rng(seed)
    per_pass = n // batch
    passes = -(-iterations // per_pass)
    order = np.stack([rng.permutation(n)[: per_pass * batch] for _ in range(passes)])
    return order.reshape(passes * per_pass, batch)[:iterations].astype(np.int32)


def optimize_rounding(
    apply: Apply,
    grid: RoundingGrid,
    inputs: jax.Array,
    targets: jax.Array,
    config: AdaRoundConfig,
    seed: int | Sequence[int] = 0,
) -> jax.Array:
    """The learned :math:`V` after ``config.iterations`` Adam steps from :math:`V_0` (one jitted loop).

    ``inputs`` / ``targets``: the cached samples along axis 0; each step takes ``batch_size`` of them
    (all when fewer), from :func:`minibatches` seeded by ``seed``.
    """
    n = int(inputs.shape[0])
    if int(targets.shape[0]) != n:
        raise ValueError(f"inputs hold {n} samples but targets {targets.shape[0]}; give one target per input")
    order = jnp.asarray(minibatches(n, min(config.batch_size, n), config.iterations, seed))
    opt = optax.adam(config.lr)
    grad = jax.grad(adaround_loss, has_aux=True)

    @jax.jit
    def run(grid: RoundingGrid, inputs: jax.Array, targets: jax.Array, order: jax.Array) -> jax.Array:
        v0 = init_rounding(grid)

        def body(t: jax.Array, carry: Any) -> Any:
            v, state = carry
            idx = order[t]
            g, _ = grad(v, grid, apply, inputs[idx], targets[idx], t, config)
            with jax.numpy_dtype_promotion("standard"):
                updates, state = opt.update(g, state, v)
                v = optax.apply_updates(v, updates)
            return v, state

        return jax.lax.fori_loop(0, config.iterations, body, (v0, opt.init(v0)))[0]

    return run(grid, inputs, targets, order)


def dataset_errors(
    apply: Apply, weights: Sequence[jax.Array], inputs: jax.Array, targets: jax.Array, chunk: int = 256
) -> list[float]:
    """:func:`reconstruction_error` of each weight in ``weights`` over all samples (in chunks of
    ``chunk`` along axis 0; one compiled function for all weights)."""
    fn = jax.jit(lambda x, y, w: reconstruction_error(apply(x, w), y) * x.shape[0])
    n = int(inputs.shape[0])
    out = []
    for w in weights:
        total = sum(float(fn(inputs[i : i + chunk], targets[i : i + chunk], w)) for i in range(0, n, chunk))
        out.append(total / n)
    return out


__all__ = [
    "GAMMA",
    "ZETA",
    "AdaRoundConfig",
    "RoundingGrid",
    "adaround_loss",
    "beta_schedule",
    "dataset_errors",
    "hard_values",
    "hard_weight",
    "init_rounding",
    "inverse_rectified_sigmoid",
    "minibatches",
    "optimize_rounding",
    "reconstruction_error",
    "rectified_sigmoid",
    "rounding_grid",
    "rounding_regularizer",
    "soft_weight",
]
