"""GPTQ's math: quantize a kernel row by row, feeding each row's error forward to the rows not yet
quantized, weighted by the inverse Hessian of the layer's output error.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023). The kernel follows the Flax convention, :math:`W \\in \\mathbb{R}^{K
\\times N}` (input :math:`K`, output :math:`N`, :math:`y = x W`), so the paper's *columns* (input
dimensions of its :math:`(N, K)` weight) are the *rows* :math:`w_k` here. With calibration inputs
:math:`X \\in \\mathbb{R}^{n \\times K}` the output error is quadratic in :math:`\\Delta W`:

.. math::

    \\tfrac1n \\|X W - X \\hat W\\|_F^2 = \\tfrac12 \\operatorname{tr}(\\Delta W^\\top H \\Delta W),
    \\qquad H = \\tfrac2n X^\\top X.

Dead inputs (:math:`H_{kk} = 0`) get :math:`H_{kk} = 1` and :math:`w_k = 0`; then
:math:`\\lambda = \\text{damp} \\cdot \\operatorname{mean}(\\operatorname{diag} H)` is added to the
diagonal and :math:`U` is the upper Cholesky factor of the inverse, :math:`H^{-1} = U^\\top U`. The
rows are quantized in order :math:`k = 0, 1, \\dots` (or by decreasing :math:`H_{kk}` with
``act_order``):

.. math::

    \\hat w_k = Q(w_k), \\qquad e_k = (w_k - \\hat w_k) / U_{kk}, \\qquad
    w_j \\leftarrow w_j - U_{kj} e_k \\quad (j > k).

The update is applied at once inside a block of ``block_size`` rows and lazily, as one matrix
product :math:`W_{>b} \\leftarrow W_{>b} - U_{b, >b}^\\top E_b`, to the rows after the block (an exact
reorganisation of the recursion: the "lazy batch" update).

Grids. Per-tensor and per-channel (``axis=-1``, one scale per output channel) parameters are
calibrated once from :math:`W` (dead rows zeroed). Per-group (``axis=0``, groups of :math:`G` input
rows, one scale per output channel and group) parameters are calibrated from the *current* rows of
the group, already updated by the errors of every earlier row, when its first row is reached; with
``static_groups=True`` they are calibrated from :math:`W` before any update. ``act_order`` with groups
requires ``static_groups=True``: each row then uses the parameters of its group in the *original*
row order, so the result is an ordinary per-group tensor (the reference's dynamic groups in permuted
order need a per-row group index, which a :class:`~qjax.QArray` does not have). The spec's
``calibration`` (minmax, percentile, mse) chooses each block's range as in :func:`qjax.calibrate`.

:math:`Q` is the spec's own encode/decode with nearest rounding (division by :math:`S` as a
multiplication by :math:`\\mathrm{fl}(1/S)`), so ``qjax.quantize(w_hat, spec, qparams=qparams)``
gives back the codes of ``w_hat`` exactly.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.numerics import QParams, QuantSpec, quantize_dequantize, tiling
from qjax.numerics.calibration import block_range, check_finite, check_float_input
from qjax.numerics.formats import CodebookFormat, IntFormat
from qjax.numerics.rounding import Rounding
from qjax.numerics.spec import Granularity

_HIGHEST = lax.Precision.HIGHEST


class HessianState(NamedTuple):
    """Running :math:`H = \\frac2n \\sum_t x_t^\\top x_t` over the ``samples`` = :math:`n` rows so far."""

    h: jax.Array  # (K, K) float32
    samples: jax.Array  # () int32


class GPTQResult(NamedTuple):
    """What :func:`gptq_quantize` returns.

    Attributes:
      w_hat: (K, N) float32, on the grid of ``qparams``: ``dequantize(quantize(w_hat, spec,
        qparams=qparams)) == w_hat`` bit for bit.
      qparams: grid-shaped parameters to pin (``QuantizedOp.weight_static``), as ``qjax.calibrate``.
      perm: (K,) int32 order in which the rows were quantized (``act_order``), else ``None``.
      loss: GPTQ's own objective :math:`\\frac12 \\sum_k \\|e_k\\|^2` (damped :math:`H`).
      error: :math:`\\frac12 \\operatorname{tr}(\\Delta W^\\top H \\Delta W)` with the undamped
        :math:`H` given (:math:`= \\|X \\Delta W\\|_F^2 / n` for :math:`H = \\frac2n X^\\top X`).
      rtn_error: the same for round-to-nearest with the spec's own calibration (for comparison).
    """

    w_hat: jax.Array
    qparams: QParams
    perm: jax.Array | None
    loss: jax.Array
    error: jax.Array
    rtn_error: jax.Array


# -- the Hessian ----------------------------------------------------------------------------------


def hessian_init(k: int) -> HessianState:
    """An empty running Hessian for ``k`` inputs."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int (the number of inputs of the layer)")
    return HessianState(jnp.zeros((k, k), jnp.float32), jnp.zeros((), jnp.int32))


@jax.jit
def _update(h: jax.Array, count: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    m = x.shape[0]
    total = count + m
    keep = count.astype(jnp.float32) / total.astype(jnp.float32)
    gram = jnp.matmul(x.T, x, precision=_HIGHEST)
    return h * keep + gram * (2.0 / total.astype(jnp.float32)), total


def hessian_update(state: HessianState, x: jax.Array) -> HessianState:
    """Add a batch of inputs ``x`` (..., K) (every leading axis counts as samples):

    .. math:: H \\leftarrow \\tfrac{n}{n+m} H + \\tfrac{2}{n+m} X^\\top X, \\qquad n \\leftarrow n + m.
    """
    check_float_input(x, "x")
    k = state.h.shape[0]
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but the Hessian is for {k} inputs; give x of shape (..., {k})"
        )
    x2 = x.reshape(-1, k).astype(jnp.float32)
    if x2.shape[0] == 0:
        return state
    return HessianState(*_update(state.h, state.samples, x2))


def hessian(x: jax.Array) -> jax.Array:
    """:math:`H = \\frac2n X^\\top X` of inputs ``x`` (..., K) in one call."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("x must have at least one axis, (..., K)")
    return hessian_update(hessian_init(int(x.shape[-1])), x).h


# -- checks ---------------------------------------------------------------------------------------


def check_spec(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The block shape of a (K, N) kernel under ``spec``, or a clear error if GPTQ cannot use it."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a qjax.QuantSpec; got {type(spec).__name__}")
    fmt = spec.format
    if isinstance(fmt, CodebookFormat):
        raise ValueError(
            f"GPTQ needs a uniform grid with a scale; dtype={spec.dtype!r} is a k-means codebook "
            "(use int2..int8 or uint2..uint8)"
        )
    if not isinstance(fmt, IntFormat):
        raise ValueError(
            f"GPTQ here rounds onto an integer grid; dtype={spec.dtype!r} is not an integer format "
            "(use int2..int8 or uint2..uint8)"
        )
    if spec.rounding != Rounding.NEAREST:
        raise ValueError(
            f"GPTQ rounds each row to nearest and corrects the error; rounding={str(spec.rounding)!r} "
            "is not supported: set rounding='nearest'"
        )
    block = tiling.block_shape(shape, spec)
    g = spec.granularity
    ok = (
        g == Granularity.PER_TENSOR
        or (g == Granularity.PER_CHANNEL and block == (shape[0], 1))
        or (g == Granularity.PER_GROUP and block[1] == 1)
    )
    if not ok:
        raise ValueError(
            f"GPTQ quantizes the rows (inputs) of a (K, N) kernel one at a time; granularity="
            f"{str(g)!r} with axis={spec.axis!r} does not fit: use 'per_tensor', 'per_channel' with "
            "axis=-1 (output channels) or 'per_group' with axis=0 (groups along the input axis K)"
        )
    return block


def _check_args(w: jax.Array, damp: float, block_size: int) -> None:
    check_float_input(w, "w")
    if jnp.ndim(w) != 2:
        raise ValueError(f"w has shape {tuple(jnp.shape(w))}; GPTQ needs a 2-D kernel (K inputs, N outputs)")
    if not (isinstance(damp, int | float) and damp > 0 and np.isfinite(damp)):
        raise ValueError(f"damp={damp!r} must be a finite number > 0 (fraction of mean diag(H)), e.g. 0.01")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int, e.g. 128")


def _as_hessian(k: int, h: jax.Array | HessianState | None, x: jax.Array | None) -> jax.Array:
    if (h is None) == (x is None):
        raise ValueError("give exactly one of h=<(K, K) Hessian or HessianState> and x=<inputs (n, K)>")
    if x is not None:
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != k:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but w has K={k} input rows; give x of shape (n, {k})"
            )
        return hessian(x)
    hh = h.h if isinstance(h, HessianState) else jnp.asarray(h)
    check_float_input(hh, "h")
    if tuple(hh.shape) != (k, k):
        raise ValueError(f"h has shape {tuple(hh.shape)} but w has K={k} input rows; H must be ({k}, {k})")
    check_finite(hh, "h")
    return hh.astype(jnp.float32)


# -- the recursion ---------------------------------------------------------------------------------


def upper_inverse_cholesky(h: jax.Array) -> jax.Array:
    """:math:`U` upper triangular with :math:`H^{-1} = U^\\top U`, from one Cholesky factorisation.

    With :math:`J` the reversal permutation and :math:`J H J = M M^\\top` (:math:`M` lower),
    :math:`U = J M^{-1} J`: :math:`U^\\top U = J (M M^\\top)^{-1} J = H^{-1}`, and :math:`U` is the
    unique such factor with a positive diagonal (the reference's Cholesky of :math:`H^{-1}`, without
    forming :math:`H^{-1}`).
    """
    k = h.shape[0]
    m = jnp.linalg.cholesky(h[::-1, ::-1])
    m_inv = jax.scipy.linalg.solve_triangular(m, jnp.eye(k, dtype=h.dtype), lower=True)
    return jnp.triu(m_inv[::-1, ::-1])


def _round_row(w: jax.Array, scale: jax.Array, zero: jax.Array | None, fmt: IntFormat) -> jax.Array:
    qp = QParams(scale, zero)
    return fmt.decode(fmt.encode(w, qp, Rounding.NEAREST, None), qp)


Carry = tuple[jax.Array, jax.Array, jax.Array]  # (W1, Q1, E1): the block's rows, (B, N) each


def _row_step(
    i: jax.Array, carry: Carry, u1: jax.Array, scale: jax.Array, zero: jax.Array | None, fmt: IntFormat
) -> Carry:
    """Quantize row ``i`` of the block and push its error onto the rows after it (in the block)."""
    w1, q1, e1 = carry
    w = w1[i]
    q = _round_row(w, scale, zero, fmt)
    err = (w - q) / u1[i, i]
    w1 = w1 - u1[i][:, None] * err[None, :]  # U is upper triangular: rows < i are untouched
    return w1, q1.at[i].set(q), e1.at[i].set(err)


def _static_block(
    carry: Carry, u1: jax.Array, start: jax.Array, rows: tuple[jax.Array, jax.Array | None], fmt: IntFormat
) -> Carry:
    """One block with fixed parameters per row (``rows``: (Kp, N) scales and zero points)."""
    scale_rows, zero_rows = rows

    def body(i: jax.Array, c: Carry) -> Carry:
        scale = lax.dynamic_index_in_dim(scale_rows, start + i, keepdims=False)
        zero = None if zero_rows is None else lax.dynamic_index_in_dim(zero_rows, start + i, keepdims=False)
        return _row_step(i, c, u1, scale, zero, fmt)

    return lax.fori_loop(0, u1.shape[0], body, carry)


def _group_block(
    carry: Carry,
    u1: jax.Array,
    groups: tuple[jax.Array, jax.Array],
    first: jax.Array,
    spec: QuantSpec,
    size: int,
) -> tuple[Carry, tuple[jax.Array, jax.Array]]:
    """One block of whole groups of ``size`` rows; each group is calibrated from its current rows.
    ``groups``: the (Kp/G, N) scales and zero points so far; ``first``: this block's first group."""
    fmt = spec.format
    assert isinstance(fmt, IntFormat)

    def body(g: jax.Array, c: tuple[Carry, tuple[jax.Array, jax.Array]]) -> Any:
        rows, (gs, gz) = c
        slab = lax.dynamic_slice_in_dim(rows[0], g * size, size, axis=0)  # (G, N), updated so far
        lo, hi = block_range(slab, spec, (size, 1))
        qp = fmt.qparams(lo, hi, spec.symmetric)  # (1, N)
        zero = None if qp.zero_point is None else qp.zero_point[0]
        step = lambda r, rc: _row_step(g * size + r, rc, u1, qp.scale[0], zero, fmt)
        rows = lax.fori_loop(0, size, step, rows)
        gs = lax.dynamic_update_slice_in_dim(gs, qp.scale, first + g, axis=0)
        if qp.zero_point is not None:
            gz = lax.dynamic_update_slice_in_dim(gz, qp.zero_point, first + g, axis=0)
        return rows, (gs, gz)

    return lax.fori_loop(0, u1.shape[0] // size, body, (carry, groups))


@functools.partial(jax.jit, static_argnames=("spec", "block", "group"))
def _gptq_rows(
    w: jax.Array,
    u: jax.Array,
    rows: tuple[jax.Array, jax.Array | None],
    groups: tuple[jax.Array, jax.Array],
    *,
    spec: QuantSpec,
    block: int,
    group: int | None,
) -> Any:
    """The blocked recursion over the (Kp, N) rows of ``w`` (Kp a multiple of ``block``).

    ``group=None``: fixed parameters per row from ``rows``; else groups of ``group`` rows calibrated
    on the fly into ``groups``. Returns ``(q, loss, groups)``.
    """
    fmt = spec.format
    assert isinstance(fmt, IntFormat)
    kp = w.shape[0]

    def body(b: jax.Array, c: Any) -> Any:
        w, q, loss, gr = c
        start = b * block
        w1 = lax.dynamic_slice_in_dim(w, start, block, axis=0)  # (B, N)
        u1 = lax.dynamic_slice(u, (start, start), (block, block))  # (B, B)
        blk = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1))
        if group is None:
            (_, q1, e1) = _static_block(blk, u1, start, rows, fmt)
        else:
            (_, q1, e1), gr = _group_block(blk, u1, gr, start // group, spec, group)
        u_rows = lax.dynamic_slice_in_dim(u, start, block, axis=0)  # (B, Kp), zero left of the block
        w = w - jnp.matmul(u_rows.T, e1, precision=_HIGHEST)  # lazy batch update of later rows
        q = lax.dynamic_update_slice_in_dim(q, q1, start, axis=0)
        return w, q, loss + 0.5 * jnp.sum(jnp.square(e1)), gr

    init = (w, jnp.zeros_like(w), jnp.zeros((), jnp.float32), groups)
    _, q, loss, groups = lax.fori_loop(0, kp // block, body, init)
    return q, loss, groups


# -- the public entry point ------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("act_order",))
def _prepare(w: jax.Array, h: jax.Array, damp: jax.Array, act_order: bool) -> Any:
    """Dead inputs fixed, the row order, and :math:`U` of the damped, permuted :math:`H`."""
    k = h.shape[0]
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], jnp.zeros_like(w), w)
    diag = jnp.diag(h)
    perm = jnp.argsort(-diag, stable=True).astype(jnp.int32) if act_order else jnp.arange(k, dtype=jnp.int32)
    h = h + (damp * jnp.mean(diag)) * jnp.eye(k, dtype=jnp.float32)
    return w, perm, upper_inverse_cholesky(h[perm][:, perm])


@jax.jit
def _output_error(h: jax.Array, w: jax.Array, w_hat: jax.Array) -> jax.Array:
    d = w - w_hat
    return 0.5 * jnp.sum(jnp.matmul(h, d, precision=_HIGHEST) * d)


def _pad_rows(a: jax.Array, kp: int, fill: float | int) -> jax.Array:
    return jnp.concatenate([a, jnp.full((kp - a.shape[0], *a.shape[1:]), fill, a.dtype)], axis=0)


def _pad_u(u: jax.Array, kp: int) -> jax.Array:
    """:math:`U` of :math:`\\operatorname{diag}(H, I)`: padded rows are decoupled and stay zero."""
    k = u.shape[0]
    return jnp.eye(kp, dtype=jnp.float32).at[:k, :k].set(u)


def gptq_quantize(
    w: jax.Array,
    spec: QuantSpec,
    *,
    h: jax.Array | HessianState | None = None,
    x: jax.Array | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQResult:
    """GPTQ of a (K, N) kernel ``w`` onto the grid of ``spec`` (see the module docstring).

    Args:
      w: the float kernel, (K inputs, N outputs).
      spec: an integer spec, per-tensor, per-channel (``axis=-1``) or per-group along K (``axis=0``).
      h: the Hessian :math:`\\frac2n X^\\top X` (K, K) or a :class:`HessianState`; or
      x: the calibration inputs (..., K) instead (exactly one of ``h`` and ``x``).
      damp: :math:`\\lambda / \\operatorname{mean}(\\operatorname{diag} H)`, > 0.
      block_size: rows per lazy-update block; rounded to a multiple of the group size so that a
        group never straddles two blocks (the result does not depend on it up to float rounding).
      act_order: quantize the rows by decreasing :math:`H_{kk}` (groups need ``static_groups``).
      static_groups: calibrate the groups from ``w`` before any update.
    """
    _check_args(w, damp, block_size)
    w = jnp.asarray(w).astype(jnp.float32)
    k, n = w.shape
    block = check_spec(spec, (k, n))
    check_finite(w, "w")
    hh = _as_hessian(k, h, x)
    group = spec.group_size if spec.granularity == Granularity.PER_GROUP else None
    if group is not None and act_order and not static_groups:
        raise ValueError(
            "act_order=True with per-group quantization needs static_groups=True: groups calibrated in "
            "the permuted order do not form contiguous groups of the original rows"
        )
    w0, perm, u = _prepare(w, hh, jnp.float32(damp), act_order)
    if not np.isfinite(np.asarray(u)).all():
        raise ValueError(
            f"the damped Hessian is not positive definite (Cholesky failed) with damp={damp}; "
            "increase damp (e.g. 0.1) or check h for NaN/negative eigenvalues"
        )
    fmt = spec.format
    assert isinstance(fmt, IntFormat)
    bs = min(k, block_size if group is None else max(1, block_size // group) * group)
    kp = -(-k // bs) * bs
    wp, up = _pad_rows(w0[perm], kp, 0.0), _pad_u(u, kp)
    if group is None or static_groups:
        qp = fmt.qparams(*block_range(w0, spec, block), spec.symmetric)
        row = lambda p, fill: _pad_rows(tiling.per_element(p, (k, n), block)[perm], kp, fill)
        rows = (row(qp.scale, 1.0), None if qp.zero_point is None else row(qp.zero_point, 0))
        q, loss, _ = _gptq_rows(wp, up, rows, (wp[:1], wp[:1]), spec=spec, block=bs, group=None)
    else:
        zdtype = jnp.float32 if spec.symmetric else fmt.value_dtype
        groups = (jnp.ones((kp // group, n), jnp.float32), jnp.zeros((kp // group, n), zdtype))
        q, loss, (gs, gz) = _gptq_rows(wp, up, (wp[:1], None), groups, spec=spec, block=bs, group=group)
        qp = QParams(gs[: k // group], None if spec.symmetric else gz[: k // group])
    w_hat = jnp.zeros_like(w).at[perm].set(q[:k])
    rtn = quantize_dequantize(w, spec)
    return GPTQResult(
        w_hat=w_hat,
        qparams=qp,
        perm=perm if act_order else None,
        loss=loss,
        error=_output_error(hh, w, w_hat),
        rtn_error=_output_error(hh, w, rtn),
    )


__all__ = [
    "GPTQResult",
    "HessianState",
    "check_spec",
    "gptq_quantize",
    "hessian",
    "hessian_init",
    "hessian_update",
    "upper_inverse_cholesky",
]
