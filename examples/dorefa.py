"""DoReFa-Net's weight quantizer (Zhou et al. 2016) as a plug-in estimator, registered as
``dorefa`` when imported.

.. math::

    n(w) = \\frac{\\tanh w}{2 \\max |\\tanh w|} + \\frac12 \\in [0, 1], \\qquad
    q_k(n) = \\frac{\\lfloor (2^k - 1)\\, n \\rceil}{2^k - 1}, \\qquad
    \\hat w = 2\\, q_k(n(w)) - 1 \\in [-1, 1],

with :math:`k` the bits of the spec's integer dtype, the maximum taken over each block of the spec
(the paper: the whole tensor, ``per_tensor``) and :math:`\\lfloor\\cdot\\rceil` round half to even.
The gradient passes straight through :math:`q_k` (:math:`\\partial q_k / \\partial n := 1`) and
exactly through :math:`\\tanh` and the maximum, as in DoReFa-Net's reference code.

:math:`\\hat w` is on :math:`2^k` uniform levels of :math:`[-1, 1]` (0 is not one of them:
:math:`2^k - 1` is odd); it replaces the magnitude of the weights, which QAT then
learns around. For weights well inside :math:`(-1, 1)`, :math:`\\tanh w \\approx w` and
:math:`\\hat w \\approx` the weights over their block's largest magnitude, rounded.

Serving: :func:`qjax.nn.convert` stores a layer's kernel with its spec's own quantizer, not with
this transform, so a DoReFa-trained model is evaluated in QAT mode (the sweep runner's
``accuracy``), not served (``serve_accuracy`` is not DoReFa's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import qjax
from qjax.numerics import QParams, QuantSpec, tiling
from qjax.numerics.formats import IntFormat


def dorefa_weights(
    x: jax.Array, spec: QuantSpec, *, key: jax.Array | None, qparams: QParams | None
) -> jax.Array:
    """The ``dorefa`` estimator (``key`` and ``qparams`` are not used: the grid is fixed)."""
    fmt = spec.format
    if not isinstance(fmt, IntFormat):
        raise ValueError(
            f"estimator 'dorefa' quantizes to 2^k levels; dtype={spec.dtype!r} is not an integer "
            "format: use int2..int8 / uint2..uint8 (k = its bits)"
        )
    levels = float(2**fmt.bits - 1)
    block = tiling.block_shape(x.shape, spec)
    t = jnp.tanh(x.astype(jnp.float32))
    peak = jnp.max(jnp.abs(tiling.tile(t, block)), axis=tiling.inner_axes(x.ndim))
    peak = jnp.maximum(peak, jnp.finfo(jnp.float32).tiny)  # an all-zero block: n = 1/2
    n = t / (2.0 * tiling.per_element(peak, x.shape, block)) + 0.5
    q = n + jax.lax.stop_gradient(jnp.round(n * levels) / levels - n)
    return (2.0 * q - 1.0).astype(x.dtype)


qjax.register_estimator("dorefa", dorefa_weights)
