"""Train-step time of a transformer stack on an accelerator: bf16 float, forward-only int8 / FP8
QAT and fully quantized int8 / FP8 training, side by side in one process.

The model: ``--layers`` pre-norm transformer blocks (``experiments.tasks.tiny_lm.Block``: causal
attention with ``--heads`` heads, 4x GELU MLP) of width ``--d`` on ``(batch, tokens, d)`` inputs,
then a Linear head to 256 classes per token (a language model's head without the embedding),
softmax cross-entropy, one optax Adam step. Every parameter is bf16 (the float step is pure bf16
training; the quantized steps quantize bf16 tensors). The Linear layers (q, k, v, o, fc1, fc2 of
each block and the head) are quantized; the attention products stay bf16.

Variants (``VARIANTS``):

* ``bf16``: the float step;
* ``int8 fwd``: int8 weights per output channel, int8 activations per token, the forward
  contraction int8 x int8 -> int32, the backward in bf16 on the float operands;
* ``fp8 fwd``: e4m3 weights and activations, per-tensor current scaling, forward only;
* ``int8 full``: ``qjax.nn.training_recipe("int8")``: also dL/dx and dL/dW on int8 operands;
* ``fp8 current``, ``fp8 delayed``, ``fp8 block-wise``: the FP8 training recipes
  ``fp8_current``, ``fp8_delayed`` (amax history 16) and ``fp8_blockwise`` (1x128 / 128x128).

Each step is ``nnx.split`` once and a ``jax.jit`` function of ``(graphdef, state, batch)``. The
variants run in interleaved rounds of 5 steps; each time is the median over rounds and each ratio
divides two medians of the same run. For each variant the script also records what the program
asks for and what the compiler made of it: the operand types of the lowered ``dot_general`` ops
that contract more than one element (e.g. ``f8E5M2 x f8E4M3FN``; the outer products of scale
vectors left out) and the custom calls of the compiled program whose target names a GEMM (cuBLAS /
cuBLASLt on GPU), so that a ratio can be read against the contractions that ran, and the loss of
one more step after the timed ones: a variant whose loss is not finite makes the run exit 1 (after
writing its results), since the time of a step that computes NaN is no result.

Run: ``python -m experiments.scripts.bench_train_step_device [--d 1024 --tokens 1024 --batch 8]
[--time-budget-s 120] [--out results.json] [--md results.md]``; on a CPU it runs too (small
``--d``/``--tokens`` for a smoke run), but the table is about accelerators.
"""

from __future__ import annotations

import argparse
import collections
import math
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax
from experiments import records
from experiments.scripts.bench_qat_step import time_variants
from experiments.tasks.tiny_lm import Block

CLASSES = 256
LAYERS = r"blocks/\d+/attn/[qkvo]|blocks/\d+/fc[12]|head"
INT8_FWD = {
    "weights": qjax.QuantSpec(dtype="int8", granularity="per_channel", axis=-1),
    "activations": qjax.QuantSpec(dtype="int8", granularity="per_token"),
}
FP8_FWD = {
    "weights": qjax.QuantSpec(dtype="float8_e4m3fn"),
    "activations": qjax.QuantSpec(dtype="float8_e4m3fn"),
}
VARIANTS: dict[str, Callable[[], qjax.nn.Rule] | None] = {
    "bf16": None,
    "int8 fwd": lambda: qjax.nn.Rule(
        path=LAYERS, weights=INT8_FWD["weights"], activations=INT8_FWD["activations"]
    ),
    "fp8 fwd": lambda: qjax.nn.Rule(
        path=LAYERS, weights=FP8_FWD["weights"], activations=FP8_FWD["activations"]
    ),
    "int8 full": lambda: qjax.nn.training_recipe("int8", LAYERS),
    "fp8 current": lambda: qjax.nn.training_recipe("fp8_current", LAYERS),
    "fp8 delayed": lambda: qjax.nn.training_recipe("fp8_delayed", LAYERS),
    "fp8 block-wise": lambda: qjax.nn.training_recipe("fp8_blockwise", LAYERS, block_size=128),
}
DOT = re.compile(
    r"stablehlo\.dot_general .*contracting_dims = \[([0-9, ]*)\] x .*"
    r": \(tensor<([0-9x]+)x(\w+)>, tensor<[0-9x]+x(\w+)>\)"
)
GEMM_CALL = re.compile(r'custom_call_target="([^"]*(?:gemm|matmul|Gemm|Matmul)[^"]*)"')


class Stack(nnx.Module):
    """``layers`` transformer blocks of width ``d``, then a Linear head to ``CLASSES`` per token."""

    def __init__(self, d: int, heads: int, layers: int, *, rngs: nnx.Rngs):
        out_std = 0.02 / (2 * layers) ** 0.5
        self.blocks = nnx.List([Block(d, heads, 4, out_std, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, CLASSES, use_bias=False, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def build(d: int, heads: int, layers: int) -> nnx.Module:
    """The float model with every parameter in bf16."""
    model = Stack(d, heads, layers, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    return model


def loss_fn(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    logits = model(x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def contracted(dims: str, shape: str) -> int:
    """The contraction size of a lowered dot_general from its lhs contracting dims ``"1, 2"`` and
    lhs shape ``"4x16x128"`` (1: an outer product, e.g. of two scale vectors)."""
    sizes = [int(n) for n in shape.split("x")]
    return int(np.prod([sizes[int(d)] for d in dims.split(",") if d.strip()]))


class Step:
    """One Adam step of a model, compiled once: ``nnx.split``, then ``jax.jit`` of
    ``(graphdef, state, batch) -> (loss, state)`` lowered and compiled for ``batch``'s shapes."""

    def __init__(self, model: nnx.Module, batch: tuple[jax.Array, jax.Array]):
        opt = qjax.training.make_optimizer(model, optax.adam(1e-4))
        step = qjax.training.make_train_step(loss_fn)

        def pure(graphdef: Any, state: Any, batch: Any) -> tuple[jax.Array, Any]:
            m, o = nnx.merge(graphdef, state)
            loss = step(m, o, batch)
            return loss, nnx.state((m, o))

        self.pure = pure
        self.graphdef, self.state = nnx.split((model, opt))
        start = time.perf_counter()
        lowered = jax.jit(pure).lower(self.graphdef, self.state, batch)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        found = DOT.findall(lowered.as_text())
        dots = collections.Counter(f"{a} x {b}" for dims, shape, a, b in found if contracted(dims, shape) > 1)
        gemms = collections.Counter(GEMM_CALL.findall(self.compiled.as_text() or ""))
        # what the program asks for (lowered dot_general operand types) and what the compiler made
        # of it (the compiled program's GEMM custom calls)
        self.contractions = {"dots": dict(sorted(dots.items())), "gemms": dict(sorted(gemms.items()))}

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        loss, self.state = self.compiled(self.graphdef, self.state, (x, y))
        return loss


def make_steps(
    d: int, heads: int, layers: int, variants: Sequence[str], batch: tuple[jax.Array, jax.Array]
) -> dict[str, Step]:
    model = build(d, heads, layers)
    steps = {}
    for name in variants:
        rule = VARIANTS[name]
        variant = nnx.clone(model) if rule is None else qjax.nn.quantize_model(model, [rule()])
        steps[name] = Step(variant, batch)
    return steps


def run(
    *,
    d: int,
    heads: int,
    layers: int,
    batch: int,
    tokens: int,
    rounds: int,
    budget_s: float,
    variants: Sequence[str] = tuple(VARIANTS),
) -> dict[str, Any]:
    """The table's rows; ``budget_s`` bounds the whole run (building and compiling the steps
    included): the timed rounds stop when it is spent, after at least 3."""
    if "bf16" not in variants:
        raise ValueError(f"variants={list(variants)}: the table divides by the bf16 step; include 'bf16'")
    deadline = time.perf_counter() + budget_s
    key_x, key_y = jax.random.split(jax.random.key(0))
    data = (
        jax.random.normal(key_x, (batch, tokens, d), jnp.bfloat16),
        jax.random.randint(key_y, (batch, tokens), 0, CLASSES),
    )
    steps = make_steps(d, heads, layers, variants, data)
    contractions = {name: step.contractions for name, step in steps.items()}
    medians, done = time_variants(steps, *data, rounds, deadline)
    losses = {name: float(step(*data)) for name, step in steps.items()}  # after every timed step
    tokens_per_step = batch * tokens
    rows = [
        {
            "variant": name,
            "ms": 1e3 * t,
            "over_bf16": t / medians["bf16"],
            "tokens_per_s": tokens_per_step / t,
            "compile_s": steps[name].compile_s,
            "loss": losses[name],
            "dots": ", ".join(f"{k}: {v}" for k, v in contractions[name]["dots"].items()),
            "gemms": ", ".join(f"{k}: {v}" for k, v in contractions[name]["gemms"].items()) or "-",
        }
        for name, t in medians.items()
    ]
    device = jax.devices()[0]
    return {
        "device": f"{device.platform} ({device.device_kind})",
        "jax": jax.__version__,
        "shape": {"d": d, "heads": heads, "layers": layers, "batch": batch, "tokens": tokens},
        "rounds": done,
        "results": rows,
    }


COLUMNS = (
    ("variant", "variant", "s"),
    ("ms / step", "ms", ".2f"),
    ("/ bf16", "over_bf16", ".3f"),
    ("tokens / s", "tokens_per_s", ".0f"),
    ("compile s", "compile_s", ".1f"),
    ("loss after", "loss", ".4f"),
    ("lowered dot_general operands (count)", "dots", "s"),
    ("compiled GEMM calls", "gemms", "s"),
)


def to_markdown(result: dict[str, Any]) -> str:
    s = result["shape"]
    head = (
        f"{result['device']}, jax {result['jax']}; {s['layers']} blocks d={s['d']} ({s['heads']} heads), "
        f"batch {s['batch']} x {s['tokens']} tokens; medians of {result['rounds']} interleaved rounds "
        "of 5 steps\n\n"
    )
    return head + records.markdown_table(result["results"], COLUMNS) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=120.0,
        help="for the whole run, compiling included (at least 3 rounds)",
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=pathlib.Path, help="write the results as JSON here")
    parser.add_argument("--md", type=pathlib.Path, help="write the table as markdown here")
    args = parser.parse_args(argv)
    if args.d % args.heads or (args.d % 128 and "fp8 block-wise" in args.variants):
        parser.error(
            f"--d {args.d}: give a multiple of --heads ({args.heads}) and, with 'fp8 block-wise', of 128 "
            "(its block size)"
        )
    result = run(
        d=args.d,
        heads=args.heads,
        layers=args.layers,
        batch=args.batch,
        tokens=args.tokens,
        rounds=args.rounds,
        budget_s=args.time_budget_s,
        variants=args.variants,
    )
    table = to_markdown(result)
    print(table)
    if args.out:
        records.write_json(args.out, result)
    if args.md:
        records.write_atomic(args.md, table)
    broken = [r["variant"] for r in result["results"] if not math.isfinite(r["loss"])]
    if broken:  # the timings are written, but a step that trains to NaN / Inf is not a result
        print(f"bench_train_step_device: the loss of {', '.join(broken)} is not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
