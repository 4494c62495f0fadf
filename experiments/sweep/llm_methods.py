"""The LLM post-training methods of the runner on a :class:`qjax.models.llama.Llama`.

With ``method.rotation: hadamard`` the runner first replaces the float model by
``rotate(cfg.method, model)`` (:func:`qjax.methods.rotate_llama`: norms fused, the residual stream
rotated, ``lm_head`` untied, ``down_proj``'s input rotated online unless
``method.rotation_online_down`` is false); every method below then runs on the rotated model, and
its per-layer diagnostics compare against it. ``apply_llm_method(cfg, base, calib)`` returns the
model a cell evaluates:

* ``method.name: llm_int8``: LLM.int8() on every linear of the blocks (threshold
  ``method.llm_int8_threshold``); embeddings and the tied LM head stay in float;
* ``method.name: ptq`` with ``method.smoothquant_alpha``: SmoothQuant factors from the calibration
  windows folded into the RMSNorms before q/k/v and gate/up (and, with ``method.smoothquant_pairs``,
  into ``up_proj`` for ``down_proj``), then the config's rules (W8A8 O1/O3);
* ``method.awq``: AWQ scales (folded into the norms and into ``up_proj`` for ``down_proj``; into
  ``v_proj`` for ``o_proj`` only without grouped-query attention, else ``o_proj`` is clipped only;
  ``down_proj`` is clipped only behind an online rotation) and clipping, block by block on the
  float model;
* ``method.gptq``: GPTQ block by block, groups ``(q, k, v)``, ``(o)``, ``(gate, up)``, ``(down)``;

and otherwise round-to-nearest with the config's rules (the cell's
:attr:`experiments.sweep.plan.Plan.rules`); AWQ and GPTQ pin their weights into the quantized model.
With ``method.name: qat`` the model returned is where QAT starts (:func:`start_qat`).
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

import qjax
from experiments.sweep.schema import Method
from qjax import methods
from qjax.methods.awq import awq_blocks
from qjax.methods.gptq import gptq_blocks
from qjax.methods.sequential import Block, capture_inputs, pin_weights
from qjax.nn.model import quantizable_layers
from qjax.nn.rules import first_match
from qjax.numerics import QParams

logger = logging.getLogger("experiments.sweep.llm_methods")


def llama_blocks(model: Any) -> tuple[list[Block], list[list[Callable[[jax.Array], None] | None]]]:
    """The blocks of a Llama for :mod:`qjax.methods.gptq` / :mod:`qjax.methods.awq`, and their
    AWQ folds (see the module docstring)."""
    from qjax.models.llama import smoothing_groups

    blocks, folds = [], []
    for bg, layer in zip(smoothing_groups(model), model.layers, strict=True):
        (attn_g, mlp_g), (v_o, up_down) = bg.norm_groups, bg.linear_pairs
        groups = (
            tuple(zip(attn_g.linear_paths, attn_g.linears, strict=True)),
            ((v_o.next_path, v_o.next),),
            tuple(zip(mlp_g.linear_paths, mlp_g.linears, strict=True)),
            ((up_down.next_path, up_down.next),),
        )
        blocks.append(Block(run=layer, groups=groups))
        folds.append([_norm_fold(attn_g.norm), _pair_fold(v_o), _norm_fold(mlp_g.norm), _pair_fold(up_down)])
    return blocks, folds


def _norm_fold(norm: Any) -> Callable[[jax.Array], None]:
    def fold(s: jax.Array) -> None:
        norm.weight.set_value(norm.weight[...] / s)

    return fold


def _pair_fold(pair: Any) -> Callable[[jax.Array], None] | None:
    if pair.kv_groups != 1:
        return None  # o_proj's input scale would have to repeat across the heads of a KV group
    if not pair.scalable:
        return None  # an online rotation between the two: no per-channel scale passes through it

    def fold(s: jax.Array) -> None:
        prev = pair.prev.kernel
        prev.set_value(prev[...] / s[None, :])

    return fold


def calibration_hidden(model: Any, calib: Sequence[jax.Array]) -> jax.Array:
    """The input of the first block on the calibration windows: (windows, T, dim)."""
    tokens = jnp.concatenate([jnp.asarray(b) for b in calib], axis=0)
    return model.embed_tokens(tokens)


def smooth_llama(model: Any, calib: Sequence[jax.Array], alpha: float, *, pairs: bool = False) -> None:
    """SmoothQuant: factors from max|X| at the inputs of q/k/v and gate/up, folded into the RMSNorms
    (the paper's recipe for Llama); with ``pairs`` also at the input of ``down_proj``, folded into
    ``up_proj``'s output columns (exact: ``silu(gate) * up`` is elementwise in up's outputs)."""
    from qjax.models.llama import smoothing_groups

    structure = smoothing_groups(model)
    groups = [g for bg in structure for g in bg.norm_groups]
    downs = [bg.linear_pairs[1] for bg in structure] if pairs else []
    if not all(pair.scalable for pair in downs):
        raise ValueError(
            "pairs=True folds factors into up_proj, but down_proj reads an online-rotated input "
            "(config.down_hadamard): smooth the rotated model with pairs=False"
        )
    firsts = [g.linears[0] for g in groups] + [pair.next for pair in downs]
    absmax = methods.collect_act_absmax(model, firsts, list(calib))
    for g, a in zip(groups, absmax[: len(groups)], strict=True):
        kernels = [lin.kernel[...] for lin in g.linears]
        s = methods.smoothing_factors(a, kernels, alpha)
        gamma, scaled = methods.smooth(g.norm.weight[...], kernels, s)
        g.norm.weight.set_value(gamma)
        for lin, w in zip(g.linears, scaled, strict=True):
            lin.kernel.set_value(w)
    for pair, a in zip(downs, absmax[len(groups) :], strict=True):
        s = methods.smoothing_factors(a, [pair.next.kernel[...]], alpha)
        w_prev, _, w_next = methods.smooth_linear_pair(pair.prev.kernel[...], None, pair.next.kernel[...], s)
        pair.prev.kernel.set_value(w_prev)
        pair.next.kernel.set_value(w_next)


def rotate(method: Any, model: Any) -> Any:
    """The model rotated as ``method`` (``method.rotation``, ``rotation_seed``,
    ``rotation_online_down``, ``rotation_qk``) says: a new model, ``model`` is left as it is."""
    return methods.rotate_llama(
        model,
        seed=method.rotation_seed,
        online_down=method.rotation_online_down,
        rotate_qk=method.rotation_qk,
    )


def _spec_of(rules: Sequence[qjax.nn.Rule]) -> Callable[[str], Any]:
    def spec_of(path: str) -> Any:
        found = first_match(rules, path)
        return None if found is None else found[1].weights

    return spec_of


def apply_llm_method(
    cfg: Any,
    base: nnx.Module,
    calib: Sequence[jax.Array],
    rules: Sequence[qjax.nn.Rule],
    quantize: Callable[[nnx.Module, list[qjax.nn.Rule]], nnx.Module],
    report: dict[str, Any],
) -> nnx.Module:
    """The model of the cell (see the module docstring); ``report`` receives the method's details."""
    m = cfg.method
    model = nnx.clone(base)
    if m.name == Method.LLM_INT8:
        n = methods.apply_llm_int8(model, r"layers/.*", threshold=m.llm_int8_threshold)
        report["llm_int8_layers"] = n
        return model
    if m.smoothquant_alpha is not None:
        smooth_llama(model, calib, m.smoothquant_alpha, pairs=m.smoothquant_pairs)
    pinned = {}
    if m.awq or m.gptq:
        blocks, folds = llama_blocks(model)
        hidden = calibration_hidden(model, calib)
        rows: list[dict[str, Any]] = []
        if m.awq:
            pinned = awq_blocks(blocks, folds, hidden, _spec_of(rules), grid=m.awq_grid, report=rows)
            # with GPTQ too, GPTQ quantizes the AWQ-scaled float kernels (AWQ's clipping is dropped)
        if m.gptq:
            pinned = gptq_blocks(
                blocks,
                hidden,
                _spec_of(rules),
                damp=m.gptq_damp,
                act_order=m.gptq_act_order,
                block_size=m.gptq_block_size,
                report=rows,
            )
        report["layers"] = rows
    quantized = quantize(model, list(rules))
    if pinned and m.name == Method.QAT:
        start_qat(quantized, pinned, float_latent=not m.gptq, keep_grid=m.keep_ptq_grid)
    elif pinned:
        pin_weights(quantized, pinned)
    return quantized


def start_qat(
    model: nnx.Module,
    pinned: Mapping[str, tuple[jax.Array, QParams]],
    *,
    float_latent: bool,
    keep_grid: bool,
) -> nnx.Module:
    """Where QAT starts from a PTQ method's ``pinned[path] = (w_hat, qparams)`` (in place):

    * ``keep_grid``: each weight quantizer keeps the method's grid ``qparams`` (fixed with the
      ``ste`` / ``clipped_ste`` estimators, the initial step sizes of ``lsq``); the latent weights
      are the model's float kernels where ``float_latent`` (AWQ: :math:`Q_{qparams}(W) = \\hat W`,
      so the model computes AWQ's, and the distance of each weight to its rounding threshold is
      kept), else ``w_hat`` (GPTQ: its weights are not the rounding of the float ones);
    * otherwise the latent weights are ``w_hat`` and the quantizers recompute their grid from them
      at every step (with a symmetric format the first grid is the method's wherever a block's
      largest :math:`|\\hat w|` is at its grid's end, as after AWQ's clipping search).
    """
    layers = {path: typing.cast(nnx.Linear, layer) for path, layer in quantizable_layers(model)}
    if keep_grid:
        start = {p: (layers[p].kernel[...] if float_latent else w, qp) for p, (w, qp) in pinned.items()}
        return pin_weights(model, start)
    for path, (w_hat, _) in pinned.items():
        layers[path].kernel.set_value(w_hat)
    return model


def outlier_table(model: Any, calib: Sequence[jax.Array], threshold: float = 6.0) -> list[dict[str, Any]]:
    """Per block and linear input (q/k/v, o, gate/up, down): ``max/median`` of the per-channel
    max|x| and the number of input features with some |x| >= ``threshold`` on the calibration windows."""
    blocks, _ = llama_blocks(model)
    h = calibration_hidden(model, calib)
    rows = []
    for b, block in enumerate(blocks):
        with capture_inputs([g[0][1] for g in block.groups]) as captured:
            h_next = block.run(h)
        for group, xs in zip(block.groups, captured, strict=True):
            stats = methods.outlier_stats(jnp.concatenate(xs, axis=0), threshold)
            rows.append({"block": b, "input_of": "/".join(p.rsplit("/", 1)[-1] for p, _ in group), **stats})
        h = h_next
    return rows


__all__ = [
    "apply_llm_method",
    "calibration_hidden",
    "llama_blocks",
    "outlier_table",
    "rotate",
    "smooth_llama",
    "start_qat",
]
