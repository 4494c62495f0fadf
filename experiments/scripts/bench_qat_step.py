"""QAT train-step time over the float step time, for qjax and Qwix, measured side by side.

Models:

* the digits CNN, batch 256 of 8x8x1 images;
* the digits MLP 64-128-128-10 (8x8 images flattened), batch 256: so small that the step's fixed
  work per call (Python, dispatch) is a large part of its time;
* an MLP of width 1024 (784-1024-1024-10, the Fashion-MNIST MLP, wide), batch 256;
* a transformer block (``experiments.tasks.tiny_lm.Block``: pre-norm, 4 heads, ``d_model`` 128,
  Linear q/k/v/o projections, causal attention, 4x GELU MLP) with a Linear 10-way head on the
  mean over tokens, batch 16 of 64 tokens. Its seven Linear layers are quantized; the attention
  products :math:`QK^T` and :math:`PV` stay float in both libraries.

Quantization, the same for qjax (``qjax.nn.quantize_model``) and Qwix (``qwix.QtProvider``): W8A8
is int8 weights with one scale per output channel and int8 activations with one dynamic scale per
example (per token for the block), straight-through estimator; W4A8 the same with int4 weights
(``QtRule(weight_qtype="int4", act_qtype="int8")``; Qwix's weights are channelwise and its
activations per row by default), for every model but the CNN (Qwix 0.1.8 fails on int4
convolution kernels); W8A8G8 is W8A8 fully quantized: both backward contractions also run on int8
gradients, one scale per row outside each contraction (qjax: ``Rule(gradients=GradientSpec(
dtype="int8", granularity="per_channel"))``; Qwix: ``QtRule(bwd_qtype="int8")``, channelwise by
default), not for the CNN either (qjax's convolution backward is simulated in float). qjax runs
twice: with its default STE backward through the
quantized operands (the exact gradient of the simulated network) and with
``ste_residuals="original"``, the float operands in the backward pass, which is what Qwix's
``QtProvider`` does for forward-only quantization: the latter is the like-for-like comparison.

A train step is forward, ``nnx.value_and_grad`` and an optax Adam update
(``qjax.training.make_train_step``), called two ways:

* ``nnx.jit``: the step as ``make_train_step`` returns it; each call walks the model and optimizer
  graphs in Python (split before, merge after), a cost that grows with the number of graph nodes;
* ``jax.jit``: ``nnx.split`` once, then a ``jax.jit`` function of ``(graphdef, state, batch)`` that
  merges, runs the same step and returns the new state (Flax's functional pattern): no graph walk
  per call.

For each model and each way, the float step and the six quantized ones run in interleaved rounds of
5 steps; each reported time is the median over rounds, and the ratios divide medians taken in the
same run (the float time is shared by the W8A8 and W4A8 rows).

Run: ``python -m experiments.scripts.bench_qat_step [--rounds 30] [--out results.json]`` (needs
``pip install qwix==0.1.8``); ``--models`` and ``--steps`` pick a subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import optax

import qjax
from experiments import records
from experiments.tasks.digits import CNN
from experiments.tasks.digits import MLP as DigitsMLP
from experiments.tasks.fashion_mnist import MLP
from experiments.tasks.tiny_lm import Block

Step = Callable[[jax.Array, jax.Array], Any]

STEPS = ("nnx.jit", "jax.jit")
SCHEMES = {"W8A8": 8, "W4A8": 4, "W8A8G8": 8}  # weight bits; activations are int8 in all
FULL = ("W8A8G8",)  # fully quantized: the two backward contractions on int8 gradients too


class BlockClassifier(nnx.Module):
    """A transformer block on ``(B, T, d)`` inputs, then a Linear head on the mean over tokens."""

    def __init__(self, d: int = 128, heads: int = 4, classes: int = 10, *, rngs: nnx.Rngs):
        self.block = Block(d, heads, 4, 0.02, rngs=rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.block(x).mean(axis=1))


@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the table: its name, a builder, its batch and which layers both libraries
    quantize (``layers``, a full-match regular expression of layer paths)."""

    name: str
    key: str  # the --models name
    build: Callable[[], nnx.Module]
    x_shape: tuple[int, ...]
    per_example_axis: int | None = None  # activations: per_channel on this axis, else per_token
    layers: str = ".*"
    schemes: tuple[str, ...] = tuple(SCHEMES)


CASES = (
    # W8A8 only: Qwix 0.1.8 fails on int4 convolution kernels (conv_general_dilated of int8 x int4)
    Case("digits CNN, batch 256", "cnn", lambda: CNN(rngs=nnx.Rngs(0)), (256, 8, 8, 1), 0, schemes=("W8A8",)),
    Case("MLP 64-128-128-10, batch 256", "mlp_small", lambda: DigitsMLP(128, rngs=nnx.Rngs(0)), (256, 64)),
    Case("MLP 784-1024-1024-10, batch 256", "mlp_wide", lambda: MLP(1024, rngs=nnx.Rngs(0)), (256, 784)),
    Case(
        "transformer block d128, batch 16x64",
        "block",
        lambda: BlockClassifier(rngs=nnx.Rngs(0)),
        (16, 64, 128),
        layers=r"block/attn/[qkvo]|block/fc[12]|head",  # not the attention products (in block/attn)
    ),
)


def loss_fn(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_step(model: nnx.Module, how: str = "nnx.jit") -> Step:
    """A closure running one jitted Adam step of ``model`` on a batch, called ``how`` (``STEPS``)."""
    opt = qjax.training.make_optimizer(model, optax.adam(1e-3))
    step = qjax.training.make_train_step(loss_fn)
    if how == "nnx.jit":
        return lambda x, y: step(model, opt, (x, y))
    if how != "jax.jit":
        raise ValueError(f"how={how!r}: use one of {STEPS}")

    @jax.jit
    def pure_step(graphdef: Any, state: Any, batch: Any) -> tuple[jax.Array, Any]:
        m, o = nnx.merge(graphdef, state)
        loss = step(m, o, batch)  # traced once: the graph walk happens at compile time only
        return loss, nnx.state((m, o))

    graphdef, state = nnx.split((model, opt))
    box = [state]

    def run(x: jax.Array, y: jax.Array) -> jax.Array:
        loss, box[0] = pure_step(graphdef, box[0], (x, y))
        return loss

    return run


def qjax_model(
    model: nnx.Module,
    per_example_axis: int | None,
    residuals: str = "quantized",
    *,
    weight_bits: int = 8,
    layers: str = ".*",
    full: bool = False,
) -> nnx.Module:
    act = (
        qjax.QuantSpec(dtype="int8", granularity="per_token")
        if per_example_axis is None
        else qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=per_example_axis)
    )
    weights = qjax.QuantSpec(dtype=f"int{weight_bits}", granularity="per_channel", axis=-1)
    gradients = qjax.nn.GradientSpec(dtype="int8", granularity="per_channel") if full else None
    rule = qjax.nn.Rule(
        path=layers, weights=weights, activations=act, ste_residuals=residuals, gradients=gradients
    )
    return qjax.nn.quantize_model(model, [rule])


def qwix_model(
    model: nnx.Module, x: jax.Array, *, weight_bits: int = 8, layers: str = ".*", full: bool = False
) -> nnx.Module:
    try:
        import qwix
    except ModuleNotFoundError:
        raise SystemExit("Qwix is not installed: pip install qwix==0.1.8") from None
    bwd = {"bwd_qtype": "int8"} if full else {}
    rules = [qwix.QtRule(module_path=layers, weight_qtype=f"int{weight_bits}", act_qtype="int8", **bwd)]
    return qwix.quantize_model(nnx.clone(model), qwix.QtProvider(rules), x)


def time_variants(
    steps: Mapping[str, Step], x: jax.Array, y: jax.Array, rounds: int, deadline: float = math.inf
) -> tuple[dict[str, float], int]:
    """Median seconds per step of each variant, timed in interleaved rounds of 5 steps, and the
    number of rounds run: ``rounds``, or fewer once ``time.perf_counter()`` passes ``deadline``
    (at least 3)."""
    for fn in steps.values():  # compile + warm up
        for _ in range(3):
            jax.block_until_ready(fn(x, y))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    done = 0
    while done < rounds and (done < 3 or time.perf_counter() < deadline):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(5):
                out = fn(x, y)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / 5)
        done += 1
    return {name: statistics.median(s) for name, s in samples.items()}, done


def case_steps(case: Case, how: str, x: jax.Array) -> dict[str, Step]:
    """The float step and, per scheme, the qjax, qjax (original residuals) and Qwix steps."""
    model = case.build()
    steps = {"float": make_step(nnx.clone(model), how)}
    axis, layers = case.per_example_axis, case.layers
    for scheme in case.schemes:
        bits, full = SCHEMES[scheme], scheme in FULL
        for name, residuals in (("qjax", "quantized"), ("qjax_original", "original")):
            qmodel = qjax_model(model, axis, residuals, weight_bits=bits, layers=layers, full=full)
            steps[f"{scheme}/{name}"] = make_step(qmodel, how)
        qwix = qwix_model(model, x, weight_bits=bits, layers=layers, full=full)
        steps[f"{scheme}/qwix"] = make_step(qwix, how)
    return steps


def rows_of(case: Case, how: str, t: dict[str, float]) -> list[dict[str, Any]]:
    """One result row per scheme from the medians ``t`` of one interleaved run."""
    rows = []
    for scheme in case.schemes:
        v = {name: t[f"{scheme}/{name}"] for name in ("qjax", "qjax_original", "qwix")}
        rows.append(
            {
                "case": case.name,
                "step": how,
                "scheme": scheme,
                "float_ms": 1e3 * t["float"],
                **{f"{k}_ms": 1e3 * s for k, s in v.items()},
                **{f"{k}_over_float": s / t["float"] for k, s in v.items()},
            }
        )
    return rows


def run(
    rounds: int, models: Sequence[str] | None = None, steps: Sequence[str] = STEPS
) -> list[dict[str, Any]]:
    key = jax.random.key(0)
    results = []
    for case in CASES:
        if models is not None and case.key not in models:
            continue
        x = jax.random.normal(key, case.x_shape)
        y = jax.random.randint(key, case.x_shape[:1], 0, 10)
        for how in steps:
            medians, _ = time_variants(case_steps(case, how, x), x, y, rounds)
            results += rows_of(case, how, medians)
    return results


COLUMNS = (  # (header, result key, format)
    ("model", "case", "s"),
    ("step", "step", "s"),
    ("scheme", "scheme", "s"),
    ("float ms", "float_ms", ".2f"),
    ("qjax QAT ms", "qjax_ms", ".2f"),
    ("Qwix QAT ms", "qwix_ms", ".2f"),
    ("qjax / float", "qjax_over_float", ".3f"),
    ("qjax (original residuals) / float", "qjax_original_over_float", ".3f"),
    ("Qwix / float", "qwix_over_float", ".3f"),
)


def to_markdown(results: Sequence[dict[str, Any]]) -> str:
    return records.markdown_table(results, COLUMNS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=pathlib.Path, help="write the results as JSON here")
    parser.add_argument(
        "--models", nargs="+", choices=[c.key for c in CASES], help="only these models (default: all)"
    )
    parser.add_argument(
        "--steps", nargs="+", choices=STEPS, default=list(STEPS), help="how the step is jitted"
    )
    args = parser.parse_args(argv)
    results = run(args.rounds, args.models, args.steps)
    device = jax.devices()[0]
    print(f"{device.platform} ({device.device_kind}), jax {jax.__version__}, {args.rounds} rounds of 5 steps")
    print(to_markdown(results))
    if args.out:
        records.write_json(
            args.out, {"device": device.device_kind, "rounds": args.rounds, "results": results}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
