"""Straight-through estimators: differentiable fake quantization for QAT.

``fake_quant(x, spec, estimator)`` returns :math:`\\hat x = Q(x)` (quantize then dequantize, in
``x.dtype``) with one of these gradients:

* ``ste``: :math:`\\partial \\hat x / \\partial x = 1` (Bengio et al. 2013).
* ``clipped_ste``: :math:`\\partial \\hat x / \\partial x = 1` where clipping did not change the
  rounded code, else 0. Integer formats: with :math:`v = \\operatorname{round}(x / S) + Z` (the
  rounding and noise of the forward pass, before its clip), the gradient passes iff
  :math:`q_{min} \\le v \\le q_{max}`; an element up to half a step beyond the representable range
  :math:`[S(q_{min} - Z), S(q_{max} - Z)]` rounds onto its edge and keeps its gradient. Float
  formats (fp8, fp4, MX, NVFP4): iff :math:`x / S` rounded onto the format's grid (continued past
  :math:`f_{max}`) lies within :math:`\\pm f_{max}`. Plug-in formats: their ``unclipped``
  (:class:`~qjax.numerics.CustomFormat`; by default :math:`x` within ``clip_range``). With
  dynamic scales (calibrated from :math:`x`) no element of the calibrated range is masked by
  construction, whatever float32 rounding does to :math:`\\max|x| / S` or to the zero point,
  except where the grid itself clips: the full-range symmetric grid (``narrow_range=False``)
  clips :math:`+\\max|x|` by design where its quotient, on the tie :math:`q_{max} + 1/2`, rounds
  up; MX's ``floor`` exponent saturates some block maxima; NVFP4's rounded fp8 block scale may.
* ``lsq`` (Esser et al. 2019): the step size :math:`s` is an input. With :math:`v = x / s`,

  .. math::

      \\frac{\\partial \\hat x}{\\partial s} = g \\cdot \\begin{cases}
          -v + \\lfloor v \\rceil & q_{min} < v < q_{max} \\\\
          q_{min} & v \\le q_{min} \\\\ q_{max} & v \\ge q_{max} \\end{cases}, \\qquad
      g = \\frac{1}{\\sqrt{N q_{max}}},

  summed over the :math:`N` elements that share :math:`s`; :math:`\\partial \\hat x/\\partial x`
  is 1 inside the range and 0 outside.
* ``pact`` (Choi et al. 2018): the clipping value :math:`\\alpha` is an input;
  :math:`y = \\operatorname{clip}(x, 0, \\alpha)` (or :math:`[-\\alpha, \\alpha]` for a signed
  format), quantized with the format's symmetric scale for :math:`[-\\alpha, \\alpha]`,
  :math:`S = \\alpha / q_{max}` (:math:`\\alpha / (q_{max} + 1/2)` on the full signed range,
  ``narrow_range=False``);
  :math:`\\partial \\hat x / \\partial \\alpha = 1` where :math:`x \\ge \\alpha` (:math:`-1` where
  :math:`x \\le -\\alpha` when signed), else 0; :math:`\\partial \\hat x / \\partial x = 1` strictly
  inside the clipping range, else 0.
* ``lsq_plus`` (Bhalgat et al. 2020): a learned step size :math:`s` and a learned offset
  :math:`\\beta` (asymmetric; see :func:`fake_quant` for the gradients).
* ``kmeans_finetune`` (Han et al. 2016, Deep Compression): not an estimator of ``x``; the weight is
  parametrised by trainable centroids and fixed indices, :math:`W = C[\\mathrm{idx}]`
  (:func:`codebook_weight`).

The scales of ``ste`` and ``clipped_ste`` are calibrated from ``x`` (dynamic) unless ``qparams``
gives them (static); either way they are constants to the gradient.

**Plug-ins.** An estimator is a function

.. code-block:: python

    fn(x, spec, *, key, qparams) -> x_hat

of a float tensor ``x`` and its :class:`~qjax.numerics.QuantSpec`: the fake-quantized value in
``x.dtype``, with the estimator's gradient inside (``jax.custom_vjp``, or
``x + stop_gradient(q - x)`` for an identity gradient). ``qparams`` are static parameters (static
activation scales, AdaRound's grid) or ``None``: calibrate from ``x``. ``key`` is a PRNG key or
``None``; an estimator registered with ``needs_key=True`` gets a key in training and ``None`` at
evaluation (a model after ``model.eval()``), where it must return its evaluation value.
:func:`register_estimator` adds one; ``fake_quant(x, spec, name)`` and
``qjax.nn.Rule(weight_estimator=name)`` then take its name. The built-ins are registered in the
same registry (:data:`ESTIMATORS`) and dispatched by the same lookup. Estimators that learn
parameters (``lsq``, ``lsq_plus``, ``pact``, ``kmeans_finetune``) stay built-in: their state is
created, initialised, trained, converted to serving parameters and sharded by
:mod:`qjax.nn` per estimator, which a plug-in protocol would have to reproduce whole.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics import kmeans, tiling
from qjax.numerics.calibration import block_range, check_finite, check_float_input
from qjax.numerics.formats import MIN_SCALE, CodebookFormat, IntFormat, QParams
from qjax.numerics.quantize import (
    check_qparams,
    decode,
    encode,
    noise_for,
    quantize_dequantize,
    unclipped,
)
from qjax.numerics.registry import Registry, parse_name
from qjax.numerics.rounding import round_to_integer
from qjax.numerics.spec import QuantSpec


class Estimator(enum.StrEnum):
    """The built-in estimators (``fake_quant`` and ``Rule`` also take a registered plug-in's name)."""

    STE = "ste"
    CLIPPED_STE = "clipped_ste"
    LSQ = "lsq"
    PACT = "pact"
    LSQ_PLUS = "lsq_plus"
    KMEANS_FINETUNE = "kmeans_finetune"


@dataclasses.dataclass(frozen=True)
class EstimatorImpl:
    """A registered estimator (see the module docstring).

    Attributes:
      fn: ``fn(x, spec, *, key, qparams, **learned) -> x_hat``.
      needs_key: draws random numbers in training: a quantized layer gives it a PRNG key stream,
        and ``key=None`` after ``model.eval()``.
      integer_forward: QAT may compute the layer's contraction in int8 (``Rule.integer_forward``,
        :mod:`qjax.nn.integer_qat`), which replays the estimator as ``ste``: declare it only when
        the forward value is ``quantize_dequantize(x, spec, key=key, qparams=qparams)`` and the
        gradient the identity (``clipped_ste``, built in, has its own mask there). Otherwise QAT
        contracts the fake-quantized operands in float.
      learns: built-ins only: the learned parameters ``fake_quant`` passes (``scale``, ``clip``,
        ``offset``); plug-ins learn none.
    """

    fn: Callable[..., jax.Array]
    needs_key: bool = False
    integer_forward: bool = False
    learns: tuple[str, ...] = ()


ESTIMATORS: Registry[EstimatorImpl] = Registry("estimator", "estimator")


def register_estimator(
    name: str,
    fn: Callable[..., jax.Array],
    *,
    needs_key: bool = False,
    integer_forward: bool = False,
    override: bool = False,
) -> EstimatorImpl:
    """Register the estimator ``name``: ``fn(x, spec, *, key, qparams) -> x_hat`` (see the module
    docstring and :class:`EstimatorImpl` for the flags). Raises ``ValueError`` for a name already
    registered unless ``override=True`` (built-in names are reserved).

    .. code-block:: python

        def ste_with_noise(x, spec, *, key, qparams):
            ...

        qjax.register_estimator("noise", ste_with_noise, needs_key=True)
        rule = qjax.nn.Rule(path=".*", weights={"dtype": "int4"}, weight_estimator="noise")
    """
    if not callable(fn):
        raise TypeError(f"register_estimator({name!r}, fn): fn must be callable; got {type(fn).__name__}")
    impl = EstimatorImpl(fn, needs_key=bool(needs_key), integer_forward=bool(integer_forward))
    return ESTIMATORS.register(name, impl, override=override)


def estimator_impl(name: str, field: str = "estimator") -> EstimatorImpl:
    """The registered estimator ``name`` (a refusal is a ``SpecError`` whose ``field`` is ``field``)."""
    return ESTIMATORS.get(name, field)


def parse_estimator(value: str, field: str = "estimator") -> Estimator | str:
    """``value`` as a rule or config holds it: an :class:`Estimator` member for a built-in, the name
    for a plug-in; an unknown name raises ``SpecError`` (``field``) listing the registered ones."""
    parsed: Estimator | str = parse_name(ESTIMATORS, Estimator, value, field)
    return parsed


def estimator_names() -> tuple[str, ...]:
    """Every registered estimator: the built-ins, then the plug-ins."""
    return ESTIMATORS.names()


_LEARNED_BY = {"scale": "lsq", "offset": "lsq_plus", "clip": "pact"}
# LSQ+ zero points are clipped to +-2^15: an offset that many steps away means training diverged,
# and the bound keeps serving's int32 zero-point correction terms small.
ZERO_POINT_LIMIT = 2**15


def fake_quant(
    x: jax.Array,
    spec: QuantSpec,
    estimator: Estimator | str = Estimator.STE,
    *,
    key: jax.Array | None = None,
    qparams: QParams | None = None,
    scale: jax.Array | None = None,
    clip: jax.Array | None = None,
    offset: jax.Array | None = None,
    grad_scale: float | None = None,
    integer_offset: bool = False,
) -> jax.Array:
    """Simulated quantization of ``x`` with the gradient of ``estimator``.

    ``lsq_plus`` (LSQ+, Bhalgat et al. 2020) quantizes asymmetrically with a learned step size
    :math:`s` and a learned offset :math:`\\beta` (``spec.symmetric=False``, an integer dtype,
    :math:`[q_{min}, q_{max}]` the full range). With :math:`v = (x - \\beta)/s`,

    .. math::

        \\hat x = s \\operatorname{clip}(\\lfloor v \\rceil, q_{min}, q_{max}) + \\beta,

    and, :math:`\\lfloor\\cdot\\rceil` passed straight through,

    .. math::

        \\frac{\\partial \\hat x}{\\partial x} = \\mathbb{1}[q_{min} < v < q_{max}], \\quad
        \\frac{\\partial \\hat x}{\\partial s} = g \\cdot \\begin{cases}
            \\lfloor v \\rceil - v & q_{min} < v < q_{max} \\\\
            q_{min} & v \\le q_{min} \\\\ q_{max} & v \\ge q_{max} \\end{cases}, \\quad
        \\frac{\\partial \\hat x}{\\partial \\beta} = g \\cdot \\mathbb{1}[v \\le q_{min}
            \\lor v \\ge q_{max}].

    Derivation: inside the range :math:`\\hat x = s \\lfloor v \\rceil + \\beta` with
    :math:`\\partial v/\\partial s = -v/s` and :math:`\\partial v/\\partial \\beta = -1/s`, so
    :math:`\\partial/\\partial s = \\lfloor v \\rceil - v` and
    :math:`\\partial/\\partial\\beta = s(-1/s) + 1 = 0`; outside, :math:`\\hat x = s q_{min|max} +
    \\beta`, so :math:`\\partial/\\partial s = q_{min|max}` and :math:`\\partial/\\partial\\beta =
    1`. Both are summed over the elements that share :math:`s` and :math:`\\beta`, and both are
    multiplied by LSQ's gradient scale :math:`g` (LSQ scales the step size's gradient; applying the
    same :math:`g` to the offset is this library's choice).

    With ``integer_offset=True`` the offset is first put on the integer grid serving needs:
    :math:`Z = \\lfloor -\\beta/s \\rceil` (an int32 zero point, clipped to
    :math:`\\pm 2^{15}`), :math:`\\beta_Z = -sZ`, and the forward value is exactly
    ``decode(encode(x, QParams(s, Z)))``, what a converted layer computes. The gradients are the
    ones above at :math:`\\beta_Z` (so :math:`v = x/s + Z`); the rounding of the offset is passed
    straight through: :math:`\\partial\\beta_Z/\\partial\\beta := 1`,
    :math:`\\partial\\beta_Z/\\partial s := 0`.

    Args:
      x: float tensor.
      spec: the quantizer.
      estimator: ``ste``, ``clipped_ste``, ``lsq``, ``pact``, ``lsq_plus``, or a registered
        plug-in (:func:`register_estimator`).
      key: PRNG key for ``rounding='stochastic'``, and for plug-ins registered with
        ``needs_key`` (``None``: their evaluation value).
      qparams: static parameters for ``ste``/``clipped_ste`` and plug-ins (else calibrated from
        ``x``).
      scale: the learned step size for ``lsq`` and ``lsq_plus``, grid-shaped or a scalar.
      clip: the learned clipping value for ``pact``, grid-shaped or a scalar.
      offset: the learned offset :math:`\\beta` for ``lsq_plus``, grid-shaped or a scalar.
      grad_scale: LSQ's gradient scale; defaults to :math:`1/\\sqrt{N q_{max}}` with :math:`N`
        the elements per scale in ``x`` (pass :math:`1/\\sqrt{N_F q_{max}}` with the features per
        example to follow the paper exactly for batched activations).
      integer_offset: ``lsq_plus`` only: round the offset onto the integer zero-point grid.
    """
    impl = estimator_impl(estimator)
    est = str(estimator)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a qjax.QuantSpec; got {type(spec).__name__}")
    check_float_input(x)
    x = jnp.asarray(x)
    tiling.block_shape(x.shape, spec)  # the spec fits x (a clear error if not)
    learned = {"scale": scale, "clip": clip, "offset": offset}
    for name, value in learned.items():
        if value is not None and name not in impl.learns:
            raise ValueError(
                f"{name}= is a learned parameter of estimator {_LEARNED_BY[name]!r}, not of "
                f"{est!r}; remove it"
            )
    if integer_offset and est != Estimator.LSQ_PLUS:
        raise ValueError(f"integer_offset=True applies to estimator 'lsq_plus', not {est!r}; remove it")
    kwargs: dict[str, Any] = {name: learned[name] for name in impl.learns}
    if "scale" in impl.learns:
        kwargs["grad_scale"] = grad_scale
    if est == Estimator.LSQ_PLUS:
        kwargs["integer_offset"] = integer_offset
    return impl.fn(x, spec, key=key, qparams=qparams, **kwargs)


def _ste(x: jax.Array, spec: QuantSpec, *, key: jax.Array | None, qparams: QParams | None) -> jax.Array:
    x_hat = quantize_dequantize(x, spec, key=key, qparams=qparams)
    # Q(x) exactly in the forward pass (x - x is exactly 0), identity in the backward pass.
    return jax.lax.stop_gradient(x_hat) + (x - jax.lax.stop_gradient(x))


def _clipped_ste_estimator(
    x: jax.Array, spec: QuantSpec, *, key: jax.Array | None, qparams: QParams | None
) -> jax.Array:
    block = tiling.block_shape(x.shape, spec)
    noise = noise_for(key, x.shape, spec)
    fmt = spec.affine_format
    if qparams is None:
        check_finite(x)
        lo, hi = block_range(x.astype(jnp.float32), spec, block)
        qparams = fmt.qparams(lo, hi, spec.symmetric)
    else:
        qparams = check_qparams(QParams(*qparams), tiling.grid_shape(x.shape, block))
    qp = jax.tree_util.tree_map(jax.lax.stop_gradient, QParams(*qparams))
    return _clipped_ste(spec, x, qp, noise)


def _kmeans_finetune_estimator(x: jax.Array, spec: QuantSpec, **_: Any) -> jax.Array:
    raise ValueError(
        "estimator='kmeans_finetune' is not a function of x: the weight is centroids[indices]; "
        "use qjax.ste.codebook_weight(centroids, indices, spec), or a qjax.nn.Rule with "
        "weight_estimator='kmeans_finetune' and a kmeans weight spec"
    )


def _lsq_plus_estimator(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None,
    qparams: QParams | None,
    scale: jax.Array | None,
    offset: jax.Array | None,
    grad_scale: float | None,
    integer_offset: bool,
) -> jax.Array:
    noise = noise_for(key, x.shape, spec)
    _qmin, qmax = _integer_format(spec, Estimator.LSQ_PLUS).qrange(spec.symmetric)
    grid = tiling.grid_shape(x.shape, tiling.block_shape(x.shape, spec))
    if scale is None or offset is None:
        raise ValueError(
            "estimator='lsq_plus' needs scale=<learned step size> and offset=<learned offset "
            "beta>; initialise them with qjax.ste.lsq_plus_init(x, spec) and hold them as parameters"
        )
    _check_param_shape(scale, grid, "scale")
    _check_param_shape(offset, grid, "offset")
    gs = _default_grad_scale(x, scale, qmax) if grad_scale is None else float(grad_scale)
    return _lsq_plus(spec, gs, bool(integer_offset), x, jnp.asarray(scale), jnp.asarray(offset), noise)


def _lsq_estimator(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None,
    qparams: QParams | None,
    scale: jax.Array | None,
    grad_scale: float | None,
) -> jax.Array:
    noise = noise_for(key, x.shape, spec)
    _qmin, qmax = _integer_format(spec, Estimator.LSQ).qrange(spec.symmetric)
    grid = tiling.grid_shape(x.shape, tiling.block_shape(x.shape, spec))
    if scale is None:
        raise ValueError(
            "estimator='lsq' needs scale=<learned step size>; initialise it with "
            "qjax.lsq_init_scale(x, spec) and hold it as a parameter"
        )
    _check_param_shape(scale, grid, "scale")
    gs = _default_grad_scale(x, scale, qmax) if grad_scale is None else float(grad_scale)
    return _lsq(spec, gs, x, jnp.asarray(scale), noise)


def _pact_estimator(
    x: jax.Array, spec: QuantSpec, *, key: jax.Array | None, qparams: QParams | None, clip: jax.Array | None
) -> jax.Array:
    noise = noise_for(key, x.shape, spec)
    _integer_format(spec, Estimator.PACT)
    grid = tiling.grid_shape(x.shape, tiling.block_shape(x.shape, spec))
    if clip is None:
        raise ValueError(
            "estimator='pact' needs clip=<learned clipping value alpha>, e.g. a parameter "
            "initialised to 6.0 or to a calibrated activation maximum"
        )
    _check_param_shape(clip, grid, "clip")
    return _pact(spec, x, jnp.asarray(clip), noise)


def _default_grad_scale(x: jax.Array, scale: jax.Array, qmax: int) -> float:
    """LSQ's :math:`1/\\sqrt{N q_{max}}`, N = elements of ``x`` that share one entry of ``scale``."""
    n = math.prod(x.shape) // max(1, math.prod(jnp.shape(scale)))
    return 1.0 / math.sqrt(n * qmax)


def _integer_format(spec: QuantSpec, est: Estimator) -> IntFormat:
    fmt = spec.format
    if not isinstance(fmt, IntFormat):
        raise ValueError(
            f"estimator={str(est)!r} learns an integer grid; dtype={spec.dtype!r} is not an "
            "integer format: use int2..int8 / uint2..uint8, or estimator 'ste'/'clipped_ste'"
        )
    if est == Estimator.LSQ_PLUS:
        if spec.symmetric:
            raise ValueError(
                f"estimator='lsq_plus' learns an offset (asymmetric quantization): set "
                f"symmetric=False for dtype={spec.dtype!r}, or use estimator 'lsq' for a symmetric grid"
            )
        return fmt
    if fmt.signed and not spec.symmetric:
        raise ValueError(
            f"estimator={str(est)!r} learns a scale with zero point 0: set symmetric=True, or "
            "use an unsigned dtype for non-negative activations"
        )
    return fmt


def _check_param_shape(p: jax.Array, grid: tuple[int, ...], name: str) -> None:
    shape = jnp.shape(p)
    try:
        ok = jnp.broadcast_shapes(shape, grid) == grid
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} has shape {shape}, which does not broadcast to the per-block grid {grid} "
            f"of this spec; give a scalar or an array of shape {grid}"
        )
    if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
        raise TypeError(f"{name} must be a float array; got dtype {jnp.result_type(p)}")
    if name == "scale" and not isinstance(p, jax.core.Tracer):
        low = float(np.min(np.asarray(p)))
        if not low > 0:  # traced (a learned scale mid-training) it is clamped to a tiny positive step
            raise ValueError(
                f"scale must be > 0 everywhere (a step size); its smallest entry is {low}; initialise it "
                "with qjax.lsq_init_scale(x, spec)"
            )


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum a grid-shaped cotangent down to the (broadcastable) shape of its parameter."""
    lead = g.ndim - len(shape)
    g = jnp.sum(g, axis=tuple(range(lead)))
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and g.shape[a] != 1)
    return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


def _to_grid(values: jax.Array, spec: QuantSpec) -> jax.Array:
    """Per-element values summed over each block: grid-shaped."""
    block = tiling.block_shape(values.shape, spec)
    return jnp.sum(tiling.tile(values, block), axis=tiling.inner_axes(values.ndim))


def _grid_param(p: jax.Array, x: jax.Array, spec: QuantSpec) -> jax.Array:
    grid = tiling.grid_shape(x.shape, tiling.block_shape(x.shape, spec))
    return jnp.broadcast_to(p.astype(jnp.float32), grid)


# --- clipped STE -------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _clipped_ste(spec: QuantSpec, x: jax.Array, qp: QParams, noise: jax.Array | None) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return decode(encode(x32, spec, qp, noise), spec, qp).astype(x.dtype)


def _clipped_ste_fwd(spec, x, qp, noise):  # type: ignore[no-untyped-def]
    inside = unclipped(x.astype(jnp.float32), spec, qp, noise)
    return _clipped_ste(spec, x, qp, noise), inside


def _clipped_ste_bwd(spec, inside, g):  # type: ignore[no-untyped-def]
    return jnp.where(inside, g, jnp.zeros_like(g)), None, None


_clipped_ste.defvjp(_clipped_ste_fwd, _clipped_ste_bwd)


# --- LSQ ---------------------------------------------------------------------------------------


def _lsq_parts(spec, x, scale, noise):  # type: ignore[no-untyped-def]
    qp = QParams(scale=jnp.maximum(_grid_param(scale, x, spec), MIN_SCALE))
    x32 = x.astype(jnp.float32)
    q = encode(x32, spec, qp, noise)
    return qp, x32, q


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lsq(
    spec: QuantSpec, grad_scale: float, x: jax.Array, scale: jax.Array, noise: jax.Array | None
) -> jax.Array:
    qp, _, q = _lsq_parts(spec, x, scale, noise)
    return decode(q, spec, qp).astype(x.dtype)


def _lsq_fwd(spec, grad_scale, x, scale, noise):  # type: ignore[no-untyped-def]
    qp, x32, q = _lsq_parts(spec, x, scale, noise)
    qmin, qmax = spec.format.qrange(spec.symmetric)
    block = tiling.block_shape(x.shape, spec)
    v = x32 * tiling.per_element(1.0 / qp.scale, x.shape, block)
    inside = (v > qmin) & (v < qmax)
    ds = jnp.where(inside, q.astype(jnp.float32) - v, jnp.where(v <= qmin, float(qmin), float(qmax)))
    return decode(q, spec, qp).astype(x.dtype), (inside, ds, jnp.zeros_like(scale))


def _lsq_bwd(spec, grad_scale, res, g):  # type: ignore[no-untyped-def]
    inside, ds, scale_like = res
    g32 = g.astype(jnp.float32)
    g_scale = _sum_to_shape(_to_grid(g32 * ds, spec) * grad_scale, scale_like.shape)
    g_scale = g_scale.astype(scale_like.dtype)
    return jnp.where(inside, g, jnp.zeros_like(g)), g_scale, None


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


# --- LSQ+ --------------------------------------------------------------------------------------


def lsq_plus_qparams(scale: jax.Array, offset: jax.Array) -> QParams:
    """The serving parameters of a learned LSQ+ quantizer: :math:`S = s`,
    :math:`Z = \\lfloor -\\beta/s \\rceil` (int32, clipped to :math:`\\pm 2^{15}`).

    :math:`\\hat x = S(q - Z)` is then :math:`s q + \\beta_Z` with :math:`\\beta_Z = -sZ`, the
    offset rounded to the nearest multiple of :math:`s`; ``fake_quant(..., 'lsq_plus',
    integer_offset=True)`` computes exactly this.
    """
    s = jnp.maximum(jnp.asarray(scale, jnp.float32), MIN_SCALE)
    z = jnp.round(-jnp.asarray(offset, jnp.float32) * (1.0 / s))
    z = jnp.clip(z, -ZERO_POINT_LIMIT, ZERO_POINT_LIMIT).astype(jnp.int32)
    return QParams(scale=s, zero_point=z)


def _lsq_plus_parts(spec, integer_offset, x, scale, offset, noise):  # type: ignore[no-untyped-def]
    """``(x_hat, q, v)``: the forward value, the clipped integers and :math:`v = (x - \\beta)/s`."""
    block = tiling.block_shape(x.shape, spec)
    s, b = _grid_param(scale, x, spec), _grid_param(offset, x, spec)
    x32 = x.astype(jnp.float32)
    if integer_offset:
        qp = lsq_plus_qparams(s, b)
        z = qp.zero_point
        assert z is not None
        q = encode(x32, spec, qp, noise)
        v = x32 * tiling.per_element(1.0 / qp.scale, x.shape, block)
        v = v + tiling.per_element(z.astype(jnp.float32), x.shape, block)
        return decode(q, spec, qp), q.astype(jnp.float32), v
    qmin, qmax = spec.format.qrange(False)
    s = jnp.maximum(s, MIN_SCALE)
    s_el, b_el = tiling.per_element(s, x.shape, block), tiling.per_element(b, x.shape, block)
    v = (x32 - b_el) * tiling.per_element(1.0 / s, x.shape, block)
    q = jnp.clip(round_to_integer(v, spec.rounding, noise), qmin, qmax)
    return q * s_el + b_el, q, v


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lsq_plus(
    spec: QuantSpec,
    grad_scale: float,
    integer_offset: bool,
    x: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    noise: jax.Array | None,
) -> jax.Array:
    return _lsq_plus_parts(spec, integer_offset, x, scale, offset, noise)[0].astype(x.dtype)


def _lsq_plus_fwd(spec, grad_scale, integer_offset, x, scale, offset, noise):  # type: ignore[no-untyped-def]
    x_hat, q, v = _lsq_plus_parts(spec, integer_offset, x, scale, offset, noise)
    qmin, qmax = spec.format.qrange(False)
    inside = (v > qmin) & (v < qmax)
    ds = jnp.where(inside, q - v, jnp.where(v <= qmin, float(qmin), float(qmax)))
    like = (jnp.zeros_like(scale), jnp.zeros_like(offset))
    return x_hat.astype(x.dtype), (inside, ds, like)


def _lsq_plus_bwd(spec, grad_scale, integer_offset, res, g):  # type: ignore[no-untyped-def]
    inside, ds, (scale_like, offset_like) = res
    g32 = g.astype(jnp.float32)
    g_scale = _sum_to_shape(_to_grid(g32 * ds, spec) * grad_scale, scale_like.shape)
    g_offset = _sum_to_shape(_to_grid(jnp.where(inside, 0.0, g32), spec) * grad_scale, offset_like.shape)
    return (
        jnp.where(inside, g, jnp.zeros_like(g)),
        g_scale.astype(scale_like.dtype),
        g_offset.astype(offset_like.dtype),
        None,
    )


_lsq_plus.defvjp(_lsq_plus_fwd, _lsq_plus_bwd)


def lsq_plus_init(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """LSQ+'s min/max initialisation per block: ``(scale, offset)`` with

    .. math::

        s = \\frac{\\max x - \\min x}{q_{max} - q_{min}}, \\qquad \\beta = \\min x - q_{min} s,

    so that :math:`s q_{min} + \\beta = \\min x` and :math:`s q_{max} + \\beta = \\max x` (the range is
    not widened to include 0, unlike the asymmetric calibration of :mod:`qjax.numerics`).
    """
    fmt = _integer_format(spec, Estimator.LSQ_PLUS)
    check_float_input(x)
    x = jnp.asarray(x, jnp.float32)
    flat = tiling.blocks_last(x, tiling.block_shape(x.shape, spec))
    lo, hi = jnp.min(flat, axis=-1), jnp.max(flat, axis=-1)
    qmin, qmax = fmt.qrange(False)
    # Halves first: no overflow for ranges near 3e38.
    scale = jnp.maximum((hi * 0.5 - lo * 0.5) * float(np.float32(2.0 / (qmax - qmin))), MIN_SCALE)
    return scale, lo - qmin * scale


# --- k-means centroid fine-tuning --------------------------------------------------------------


def codebook_weight(centroids: jax.Array, indices: jax.Array, spec: QuantSpec) -> jax.Array:
    """The weight of k-means centroid fine-tuning (Deep Compression, Han et al. 2016).

    Each block :math:`b` of the weight (per-tensor: one; per-channel: one per channel) has the
    centroids :math:`c_{b,0..K-1}` (``centroids``, shape ``grid + (K,)``) and every element a fixed
    index (``indices``, the weight's shape):

    .. math::

        W_i = c_{b(i),\\, \\mathrm{idx}_i}, \\qquad
        \\frac{\\partial L}{\\partial c_{b,k}} = \\sum_{i \\in b:\\ \\mathrm{idx}_i = k}
            \\frac{\\partial L}{\\partial W_i}.

    The gradient is autodiff's of the gather (a scatter-add); every weight lies on a centroid of
    its block by construction, whatever the centroids are trained to.
    """
    if not isinstance(spec.format, CodebookFormat):
        raise ValueError(f"codebook_weight needs a kmeans spec (kmeans1..kmeans8); got dtype={spec.dtype!r}")
    block = tiling.block_shape(indices.shape, spec)
    grid = tiling.grid_shape(indices.shape, block)
    k = 2**spec.format.bits
    if tuple(centroids.shape) != (*grid, k):
        raise ValueError(
            f"centroids have shape {tuple(centroids.shape)}, but a {spec.dtype} codebook of a "
            f"{tuple(indices.shape)} weight under this spec has shape {(*grid, k)}"
        )
    flat = kmeans.lookup(centroids, tiling.blocks_last(indices, block))
    return tiling.unblocks_last(flat, indices.shape, block)


# --- PACT --------------------------------------------------------------------------------------


def _pact_parts(spec, x, clip):  # type: ignore[no-untyped-def]
    alpha = _grid_param(clip, x, spec)
    qmin, _ = spec.format.qrange(spec.symmetric)
    qp = QParams(scale=spec.format.symmetric_scale(alpha))
    upper = tiling.per_element(alpha, x.shape, tiling.block_shape(x.shape, spec))
    lower = -upper if qmin < 0 else jnp.zeros_like(upper)
    return qp, x.astype(jnp.float32), lower, upper


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pact(spec: QuantSpec, x: jax.Array, clip: jax.Array, noise: jax.Array | None) -> jax.Array:
    qp, x32, lower, upper = _pact_parts(spec, x, clip)
    y = jnp.clip(x32, lower, upper)
    return decode(encode(y, spec, qp, noise), spec, qp).astype(x.dtype)


def _pact_fwd(spec, x, clip, noise):  # type: ignore[no-untyped-def]
    _, x32, lower, upper = _pact_parts(spec, x, clip)
    inside = (x32 > lower) & (x32 < upper)
    d_alpha = (x32 >= upper).astype(jnp.float32)
    if spec.format.qrange(spec.symmetric)[0] < 0:
        d_alpha = d_alpha - (x32 <= lower).astype(jnp.float32)
    return _pact(spec, x, clip, noise), (inside, d_alpha, jnp.zeros_like(clip))


def _pact_bwd(spec, res, g):  # type: ignore[no-untyped-def]
    inside, d_alpha, clip_like = res
    g_clip = _sum_to_shape(_to_grid(g.astype(jnp.float32) * d_alpha, spec), clip_like.shape)
    g_clip = g_clip.astype(clip_like.dtype)
    return jnp.where(inside, g, jnp.zeros_like(g)), g_clip, None


_pact.defvjp(_pact_fwd, _pact_bwd)


def lsq_init_scale(x: jax.Array, spec: QuantSpec) -> jax.Array:
    """LSQ's initial step size per block: :math:`2\\,\\mathbb{E}|x| / \\sqrt{q_{max}}`."""
    fmt = _integer_format(spec, Estimator.LSQ)
    check_float_input(x)
    x = jnp.asarray(x, jnp.float32)
    block = tiling.block_shape(x.shape, spec)
    mean_abs = jnp.mean(tiling.tile(jnp.abs(x), block), axis=tiling.inner_axes(x.ndim))
    _, qmax = fmt.qrange(spec.symmetric)
    return jnp.maximum(2.0 * mean_abs / math.sqrt(qmax), MIN_SCALE)


ESTIMATORS.register(Estimator.STE.value, EstimatorImpl(_ste, integer_forward=True))
ESTIMATORS.register(Estimator.CLIPPED_STE.value, EstimatorImpl(_clipped_ste_estimator, integer_forward=True))
ESTIMATORS.register(Estimator.LSQ.value, EstimatorImpl(_lsq_estimator, learns=("scale",)))
ESTIMATORS.register(Estimator.PACT.value, EstimatorImpl(_pact_estimator, learns=("clip",)))
ESTIMATORS.register(Estimator.LSQ_PLUS.value, EstimatorImpl(_lsq_plus_estimator, learns=("scale", "offset")))
ESTIMATORS.register(Estimator.KMEANS_FINETUNE.value, EstimatorImpl(_kmeans_finetune_estimator))
ESTIMATORS.seal()
