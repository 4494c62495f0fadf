"""The first ``qjax.nn.convert`` of the quickstart CNN: its kernels quantized as one compiled
program (what ``convert`` does) against one compiled program per layer (what it did before),
each measured in a fresh process (a first call pays the compilations), alternating the two.

The quickstart's model (``experiments.tasks.fashion_mnist.CNN``, W4A8: int4 weights per output
channel, int8 static activations) is quantized and calibrated on one batch. ``model``: the whole
``convert`` call; ``per_layer``: only the kernels' quantization, one compiled program per layer (a
lower bound of the former ``convert``, which also cloned the model and checked each layer). The
number to read is the ratio of the medians: absolute times move with the machine's load.

Run: ``python -m experiments.scripts.bench_convert [--repeats 5] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

from experiments import records

MODES = ("model", "per_layer")


def child(mode: str) -> float:
    """Build, quantize and calibrate the CNN; return the seconds of the first conversion."""
    import flax.nnx as nnx
    import jax.numpy as jnp

    import qjax
    from experiments.tasks.fashion_mnist import CNN
    from qjax.nn import Rule
    from qjax.nn.ops import quantize_kernels

    model = CNN(rngs=nnx.Rngs(0))
    model.eval()
    weights = qjax.QuantSpec(dtype="int4", granularity="per_channel", axis=-1)
    activations = qjax.QuantSpec(dtype="int8")
    rules = [Rule(path=".*", weights=weights, activations=activations, activation_scale="static")]
    qmodel = qjax.nn.calibrate(qjax.nn.quantize_model(model, rules), [jnp.ones((8, 28, 28, 1))])
    start = time.perf_counter()
    if mode == "model":
        qjax.nn.convert(qmodel)
    else:  # the former convert: one quantizer program per layer
        for _, layer, op in qjax.nn.quantized_ops(qmodel):
            kernel = getattr(layer, qjax.nn.layer_hook(layer).kernel)[...]
            quantize_kernels([(op, kernel)])[0].data.block_until_ready()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({"seconds": child(args.child)}))
        return {}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            command = [sys.executable, "-m", "experiments.scripts.bench_convert", "--child", mode]
            out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
            times[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    result = {
        "model": "fashion_mnist CNN (quickstart), W4A8 static",
        "repeats": args.repeats,
        "seconds": times,
        "median_s": {mode: statistics.median(t) for mode, t in times.items()},
        "ratio_model_over_per_layer": statistics.median(times["model"])
        / statistics.median(times["per_layer"]),
        "environment": records.environment(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    if args.out:
        records.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
