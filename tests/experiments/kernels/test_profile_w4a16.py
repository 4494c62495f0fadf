"""The W4A16 profile: its partial kernels compute what they claim (interpreter, against numpy), and
the script runs end to end and writes its rows."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.kernels import profile_w4a16 as pw
from qjax.kernels import w4a16
from qjax.kernels.experimental import hopper_w4
from qjax.kernels.experimental.w4a16_variants import w4a16_matmul_variant


@pytest.mark.parametrize("split_k", [1, 3])
def test_parts_compute_column_sums(split_k):
    """``stream`` sums the packed bytes per column and ``unpack`` the signed codes per column, over
    every K range (3 ranges of 5 steps: 2 + 2 + 1, the repeated step masked out)."""
    rng = np.random.default_rng(split_k)
    k, n, g = 640, 130, 64
    q = rng.integers(-8, 8, (k, n))
    w = w4a16.pack_w4(jnp.asarray(q, jnp.int32), jnp.ones((k // g, n), jnp.float32), group_size=g)
    x = jnp.zeros((3, k), jnp.bfloat16)
    blocks = {"block_k": 128}  # 5 K steps of two groups
    for body, expect in [
        (pw.stream_body, np.asarray(w.packed).astype(np.int64).sum(axis=0)[:n]),
        (pw.unpack_body, q.sum(axis=0)),
    ]:
        f = functools.partial(
            w4a16_matmul_variant,
            out_dtype=jnp.float32,
            blocks=blocks,
            backend="interpret",
            split_k=split_k,
            gpu_body=body,
        )
        y = np.asarray(jax.jit(f)(x, w))
        assert y.shape == (3, n)
        np.testing.assert_array_equal(y, np.broadcast_to(expect.astype(np.float32), (3, n)))


def test_variants_are_distinct_one_change_each():
    rows = pw.variants(16, "interpret")
    names = [name for name, _, _ in rows]
    assert len(set(names)) == len(names)
    assert names[:5] == ["bf16", "xla-read", "stream", "unpack", "kernel"]


def test_grid_is_read_from_the_program():
    w = w4a16.pack_w4(jnp.zeros((256, 384), jnp.int32), jnp.ones((2, 384), jnp.float32), group_size=128)
    x = jnp.zeros((1, 256), jnp.bfloat16)
    f = functools.partial(w4a16.w4a16_matmul, backend="interpret", blocks={"block_n": 128}, split_k=2)
    assert pw.pallas_grid(f, x, w) == "1x3x2"
    assert pw.pallas_grid(lambda x, w: jnp.sum(w.packed), x, w) == "-"


def test_main_writes_rows(tmp_path, monkeypatch):
    full = pw.variants
    keep = {"bf16", "stream", "unpack", "kernel swap_ab"}
    monkeypatch.setattr(pw, "variants", lambda m, b: [r for r in full(m, b) if r[0] in keep])
    out = tmp_path / "profile.json"
    assert pw.main(["--interpret", "--m", "1", "--copies", "2", "--repeats", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["backend"] == "interpret" and data["meta"]["clock"] == "wall"
    rows = data["rows"]
    assert [r["row"] for r in rows] == ["bf16", "stream", "unpack", "kernel swap_ab"]
    for r in rows:
        assert "error" not in r and r["us"] > 0 and r["gb_per_s"] > 0
    assert rows[0]["grid"] == "-" and rows[1]["grid"] == "1x2x1"


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        pw.main(["--interpret", "--shapes", "nope"])
    with pytest.raises(SystemExit):
        pw.main(["--interpret", "--m", "0"])
    if jax.default_backend() != "gpu":
        with pytest.raises(SystemExit):
            pw.main(["--interpret", "--clock", "device"])
        assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("m", [1, 16])
def test_every_gpu_row_lowers_for_cuda(m, lowered):
    """What a GPU run times: every row (the PTX unpack rows included) lowers for cuda."""
    w = w4a16.pack_w4(jnp.zeros((1024, 512), jnp.int32), jnp.ones((8, 512), jnp.float32), group_size=128)
    x = jnp.zeros((m, 1024), jnp.bfloat16)
    wb = jnp.zeros((1024, 512), jnp.bfloat16)
    weights = {"bf16": wb, "w4": w, "w4-hopper": hopper_w4.prepare_w4(w)}
    rows = pw.variants(m, "gpu")
    assert {"unpack asm", "kernel unpack=asm", "mgpu", "mgpu a_in_smem"} <= {name for name, _, _ in rows}
    for name, family, fn in rows:
        text = lowered(jax.jit(fn), x, weights[family], platform="cuda")
        custom_call = "mosaic_gpu" if family == "w4-hopper" else "triton"
        assert name in ("bf16", "xla-read") or custom_call in text.lower(), name
