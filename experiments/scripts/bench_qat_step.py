"""QAT train-step time over the float step time, for qjax and Qwix, measured side by side.

Models: the digits CNN (batch 256 of 8x8x1 images) and an MLP of width 1024 (784 -> 1024 -> 1024 ->
10, batch 256). Quantization: int8 weights with per-output-channel scales and int8 activations with
one dynamic scale per example, straight-through estimator, on every Linear/Conv; the same settings
for qjax (``qjax.nn.quantize_model``) and Qwix (``qwix.QtProvider`` with ``QtRule(weight_qtype=
"int8", act_qtype="int8")``, whose weights are channelwise and activations per batch row by
default). qjax runs twice: with its default STE backward through the quantized operands (the exact
gradient of the simulated network) and with ``ste_residuals="original"``, the float operands in the
backward pass, which is what Qwix's ``QtProvider`` does for forward-only quantization: the latter is
the like-for-like comparison. Each train step is ``nnx.jit``-compiled: forward,
``nnx.value_and_grad``, an optax Adam update. The four variants run in interleaved rounds; each
reported time is the median over rounds, and the ratios divide medians taken in the same run.

Run: ``python -m experiments.scripts.bench_qat_step [--rounds 30] [--out results.json]`` (needs
``pip install qwix==0.1.8``).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import optax

import qjax
from experiments import records
from experiments.tasks.digits import CNN
from experiments.tasks.fashion_mnist import MLP


def loss_fn(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_step(model: nnx.Module) -> Callable[[jax.Array, jax.Array], Any]:
    """A closure running one jitted Adam step of ``model`` on a batch."""
    opt = qjax.training.make_optimizer(model, optax.adam(1e-3))
    step = qjax.training.make_train_step(loss_fn)
    return lambda x, y: step(model, opt, (x, y))


def qjax_model(model: nnx.Module, per_example_axis: int | None, residuals: str = "quantized") -> nnx.Module:
    act = (
        qjax.QuantSpec(dtype="int8", granularity="per_token")
        if per_example_axis is None
        else qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=per_example_axis)
    )
    weights = qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1)
    rule = qjax.nn.Rule(path=".*", weights=weights, activations=act, ste_residuals=residuals)
    return qjax.nn.quantize_model(model, [rule])


def qwix_model(model: nnx.Module, x: jax.Array) -> nnx.Module:
    try:
        import qwix
    except ModuleNotFoundError:
        raise SystemExit("Qwix is not installed: pip install qwix==0.1.8") from None
    rules = [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
    return qwix.quantize_model(nnx.clone(model), qwix.QtProvider(rules), x)


def time_variants(
    steps: dict[str, Callable[[jax.Array, jax.Array], Any]], x: jax.Array, y: jax.Array, rounds: int
) -> dict[str, float]:
    """Median seconds per step of each variant, timed in interleaved rounds of 5 steps."""
    for fn in steps.values():  # compile + warm up
        for _ in range(3):
            jax.block_until_ready(fn(x, y))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(5):
                out = fn(x, y)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / 5)
    return {name: statistics.median(s) for name, s in samples.items()}


def run(rounds: int) -> list[dict[str, Any]]:
    key = jax.random.key(0)
    cases = [
        ("digits CNN, batch 256", CNN(rngs=nnx.Rngs(0)), jax.random.uniform(key, (256, 8, 8, 1)), 0),
        (
            "MLP 784-1024-1024-10, batch 256",
            MLP(hidden=1024, rngs=nnx.Rngs(0)),  # the Fashion-MNIST MLP, wide
            jax.random.normal(key, (256, 784)),
            None,
        ),
    ]
    y = jax.random.randint(key, (256,), 0, 10)
    results = []
    for name, model, x, axis in cases:
        steps = {
            "float": make_step(nnx.clone(model)),
            "qjax": make_step(qjax_model(model, axis)),
            "qjax_original": make_step(qjax_model(model, axis, "original")),
            "qwix": make_step(qwix_model(model, x)),
        }
        t = time_variants(steps, x, y, rounds)
        results.append(
            {
                "case": name,
                **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                "qjax_over_float": t["qjax"] / t["float"],
                "qjax_original_over_float": t["qjax_original"] / t["float"],
                "qwix_over_float": t["qwix"] / t["float"],
            }
        )
    return results


COLUMNS = (  # (header, result key, format)
    ("model", "case", "s"),
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
    args = parser.parse_args(argv)
    results = run(args.rounds)
    device = jax.devices()[0]
    print(f"{device.platform} ({device.device_kind}), jax {jax.__version__}, {args.rounds} rounds of 5 steps")
    print(to_markdown(results))
    if args.out:
        records.write_json(args.out, {"device": device.device_kind, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
