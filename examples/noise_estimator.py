"""Noise-injection QAT as a plug-in estimator, registered as ``noise`` when imported.

In training, a tensor is not rounded but perturbed by uniform noise of one step of its grid:

.. math::

    \\hat x = x + S u, \\qquad u \\sim U[-\\tfrac12, \\tfrac12), \\qquad
    \\frac{\\partial \\hat x}{\\partial x} = 1,

with :math:`S` the scale (step) of :math:`x`'s block under the spec, calibrated from :math:`x`
(or the static ``qparams``) and a constant to the gradient. Nearest rounding inside the range moves
a value by at most :math:`S/2` too; the noise is its differentiable stand-in, uniform over the same
interval (pseudo quantization noise: Défossez et al. 2021, "Differentiable Model Compression via
Pseudo Quantization Noise"; Baskin et al. 2018, "UNIQ"). Values are not clipped to the grid's
range, so :math:`|\\hat x - x| \\le S/2` everywhere. Integer formats only (one step :math:`S`).

At evaluation (``key=None``: a quantized model after ``model.eval()``, or a call without a key) the
value is :math:`Q(x)`, nearest (the spec's) rounding on the same grid with a straight-through
gradient: what a converted (served) layer computes.

.. code-block:: yaml

    plugins: [examples.noise_estimator]
    quant: {weights: {dtype: int4, granularity: per_channel, axis: -1}, weight_estimator: noise}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import qjax
from qjax.numerics import QParams, QuantSpec, tiling
from qjax.numerics.formats import IntFormat


def step_size(x: jax.Array, spec: QuantSpec, qparams: QParams | None = None) -> jax.Array:
    """:math:`S` of every element of ``x`` (float32, ``x``'s shape): its block's scale, calibrated
    from ``x`` unless ``qparams`` gives it, with no gradient."""
    if not isinstance(spec.format, IntFormat):
        raise ValueError(
            f"estimator 'noise' adds one step of an integer grid; dtype={spec.dtype!r} is not an "
            "integer format: use int2..int8 / uint2..uint8"
        )
    block = tiling.block_shape(x.shape, spec)
    qp = qjax.calibrate(x, spec) if qparams is None else QParams(*qparams)
    return tiling.per_element(jax.lax.stop_gradient(qp.scale.astype(jnp.float32)), x.shape, block)


def noise_injection(
    x: jax.Array, spec: QuantSpec, *, key: jax.Array | None, qparams: QParams | None
) -> jax.Array:
    """The ``noise`` estimator: ``x + S u`` with a key (training), ``Q(x)`` without (evaluation);
    the gradient is the identity either way."""
    if key is None:
        x_hat = qjax.quantize_dequantize(x, spec, qparams=qparams)
        return jax.lax.stop_gradient(x_hat) + (x - jax.lax.stop_gradient(x))
    u = jax.random.uniform(key, x.shape, jnp.float32, -0.5, 0.5)
    return x + jax.lax.stop_gradient((step_size(x, spec, qparams) * u).astype(x.dtype))


qjax.register_estimator("noise", noise_injection, needs_key=True)
