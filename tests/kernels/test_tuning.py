"""qjax.kernels.tuning: the block table by kernel, backend, M bucket and device family."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from qjax.kernels import fp8, tuning, w4a16, w8a8

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"


@pytest.mark.parametrize(
    ("kind", "family"),
    [
        (H100, "hopper"),
        ("NVIDIA H200", "hopper"),
        ("NVIDIA GH200 480GB", "hopper"),
        ("NVIDIA H100 PCIe", "hopper"),
        (A100, None),
        ("cpu", None),
        ("TPU v5 lite", None),
        ("", None),
        (None, None),
    ],
)
def test_device_family(kind, family):
    assert tuning.device_family(kind) == family


def _bucket(kernel, backend, family, m):
    key = (kernel, backend) if family is None else (kernel, backend, family)
    return next(b for limit, b in tuning.BLOCK_TABLE[key] if m <= limit)


@pytest.mark.parametrize("kernel", ["w8a8", "fp8", "w4a16"])
@pytest.mark.parametrize("m", [1, 16, 17, 64, 65, 4096])
def test_the_device_family_entry_wins_on_its_devices(kernel, m):
    hopper = tuning.choose_blocks(kernel, "gpu", m, device_kind=H100)
    generic = tuning.choose_blocks(kernel, "gpu", m, device_kind=A100)
    assert hopper == _bucket(kernel, "gpu", "hopper", m)
    assert generic == _bucket(kernel, "gpu", None, m)
    assert tuning.table_key(kernel, "gpu", H100) == (kernel, "gpu", "hopper")
    assert tuning.table_key(kernel, "cuda", A100) == (kernel, "gpu")
    # no family entry for the interpreter or TPU: the generic one, whatever the device
    assert tuning.choose_blocks(kernel, "interpret", m, device_kind=H100) == _bucket(
        kernel, "interpret", None, m
    )
    assert tuning.choose_blocks(kernel, "tpu", m, device_kind=H100) == _bucket(kernel, "tpu", None, m)


def test_buckets_and_overrides():
    table = tuning.BLOCK_TABLE[("w8a8", "gpu", "hopper")]
    assert tuning.choose_blocks("w8a8", "gpu", 16, device_kind=H100) == table[0][1]
    assert tuning.choose_blocks("w8a8", "gpu", 17, device_kind=H100) == table[1][1]
    assert tuning.choose_blocks("w8a8", "gpu", 10**6, device_kind=H100) == table[-1][1]
    b = tuning.choose_blocks("w8a8", "gpu", 1, {"block_n": 32}, device_kind=H100)
    assert b == tuning.Blocks(table[0][1].block_m, 32, table[0][1].block_k, table[0][1].num_warps, 4)
    assert tuning.choose_blocks("w8a8", "gpu", 1, tuning.Blocks(16, 16, 16)) == tuning.Blocks(16, 16, 16)
    with pytest.raises(ValueError, match=r"unknown fields \['block_x'\]"):
        tuning.choose_blocks("w8a8", "gpu", 1, {"block_x": 1})
    with pytest.raises(ValueError, match="kernel 'w2a2' has no 'gpu' backend"):
        tuning.choose_blocks("w2a2", "gpu", 1)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the lookup on a host without a GPU")
def test_lowering_for_a_gpu_from_another_host_uses_the_generic_entry():
    """The host's device is not the target, so no family applies (unless ``device_kind`` says)."""
    assert tuning.table_key("w8a8", "gpu") == ("w8a8", "gpu")
    assert tuning.choose_blocks("w8a8", "gpu", 1) == _bucket("w8a8", "gpu", None, 1)


def test_set_blocks_for_a_family(monkeypatch):
    monkeypatch.setattr(tuning, "BLOCK_TABLE", dict(tuning.BLOCK_TABLE))
    mine = tuning.Blocks(32, 64, 64, 4, 2)
    tuning.set_blocks("fp8", "gpu", ((8, tuning.Blocks(16, 64, 64)), (64, mine)), family="hopper")
    assert tuning.choose_blocks("fp8", "gpu", 10**6, device_kind=H100) == mine  # the last bucket is open
    assert tuning.choose_blocks("fp8", "gpu", 8, device_kind=H100) == tuning.Blocks(16, 64, 64)
    assert tuning.choose_blocks("fp8", "gpu", 8, device_kind=A100) == _bucket("fp8", "gpu", None, 8)
    with pytest.raises(ValueError, match="family='ampere': expected one of"):
        tuning.set_blocks("fp8", "gpu", ((8, mine),), family="ampere")
    with pytest.raises(ValueError, match="increasing m"):
        tuning.set_blocks("fp8", "gpu", ((8, mine), (8, mine)))


def _lower_with(kernel: str, blocks: tuning.Blocks, m: int, lowered) -> str:
    k, n = 1024, 384
    s = jax.ShapeDtypeStruct
    if kernel == "w4a16":
        w = jax.eval_shape(
            functools.partial(w4a16.pack_w4, group_size=128),
            s((k, n), jnp.int8),
            s((k // 128, n), jnp.float32),
        )
        f = functools.partial(w4a16.w4a16_matmul, backend="gpu", blocks=blocks)
        return lowered(jax.jit(f), s((m, k), jnp.bfloat16), w, platform="cuda")
    dtype = jnp.int8 if kernel == "w8a8" else jnp.float8_e4m3fn
    matmul = w8a8.w8a8_matmul if kernel == "w8a8" else fp8.fp8_matmul
    f = functools.partial(matmul, backend="gpu", blocks=blocks)
    xs, ws = s((m, 1), jnp.float32), s((1, n), jnp.float32)
    return lowered(jax.jit(f), s((m, k), dtype), xs, s((k, n), dtype), ws, platform="cuda")


@pytest.mark.parametrize(
    "key", [key for key in tuning.BLOCK_TABLE if key[1] == "gpu" and key[0] != "act_quant"]
)
def test_every_gpu_entry_lowers_for_cuda(key, lowered):
    for limit, blocks in tuning.BLOCK_TABLE[key]:
        m = min(limit, 300)
        assert "triton" in _lower_with(key[0], blocks, m, lowered).lower()


@pytest.mark.parametrize("size", ["small", "large"])
def test_tuning_candidates_lower_for_cuda(size, lowered):
    """Every block candidate ``experiments.kernels.tune`` times lowers for W8A8 and FP8, with the weight
    ``(K, N)`` and stored ``(N, K)`` (the experimental ``*_nk`` kernels; a candidate that fails on the
    device wastes device time)."""
    from experiments.kernels.tune import CANDIDATES
    from qjax.kernels.experimental import nk_layout

    m, k, n = (16, 1024, 512) if size == "small" else (512, 1024, 512)
    s = jax.ShapeDtypeStruct
    kernels = [(jnp.int8, w8a8.w8a8_matmul, nk_layout.w8a8_matmul_nk)]
    kernels += [(jnp.float8_e4m3fn, fp8.fp8_matmul, nk_layout.fp8_matmul_nk)]
    for blocks in CANDIDATES[size]:
        for dtype, matmul, matmul_nk in kernels:
            for fn, w_shape in ((matmul, (k, n)), (matmul_nk, (n, k))):
                f = functools.partial(fn, backend="gpu", blocks=blocks)
                args = (s((m, k), dtype), s((m, 1), jnp.float32), s(w_shape, dtype), s((1, n), jnp.float32))
                assert "triton" in lowered(jax.jit(f), *args, platform="cuda").lower()
