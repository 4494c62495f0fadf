"""experiments.kernels.bench: byte/FLOP accounting, roofline, crossover, and a CPU smoke run."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.kernels import bench as bk

H100 = bk.device_peaks("NVIDIA H100 80GB HBM3")


def test_w4a16_accounting_by_hand():
    m, k, n = 1, 4096, 4096
    weights = k * n // 2  # two int4 codes per byte
    scales = (k // 128) * n * 4  # f32 scale per group of 128 rows and column
    assert bk.nominal_weight_bytes("w4a16", k, n, group_size=128, scale_itemsize=4) == weights + scales
    assert weights + scales == 8_388_608 + 524_288
    # the packed weight the benchmark makes has exactly that size (no padding at this shape)
    packed = jax.eval_shape(lambda key: bk.make_weights("w4", key, k, n), jax.random.key(0))
    assert bk.tree_nbytes(packed) == weights + scales
    activations, output = m * k * 2, m * n * 2
    total = bk.traffic_bytes("w4a16", m, k, n, weights + scales)
    assert total == activations + weights + scales + output == 8_929_280
    assert bk.matmul_flops(m, k, n) == 33_554_432
    # at M = 1 the roofline is the memory bound: bytes / 3.35 TB/s
    assert bk.roofline_seconds("w4a16", 33_554_432, total, H100) == pytest.approx(total / 3.35e12)


def test_other_kernels_accounting_by_hand():
    m, k, n = 16, 4096, 4096
    assert bk.nominal_weight_bytes("bf16", k, n) == 2 * k * n
    assert bk.nominal_weight_bytes("w8a8", k, n) == k * n + 4 * n
    assert bk.nominal_weight_bytes("fp8", k, n) == k * n + 4 * n
    assert bk.nominal_weight_bytes("w4a16", k, n, zeros=True) == k * n // 2 + 2 * 32 * n * 4
    assert bk.traffic_bytes("bf16", m, k, n, 2 * k * n) == 2 * m * k + 2 * k * n + 2 * m * n
    assert bk.traffic_bytes("w8a8", m, k, n, k * n + 4 * n) == (m * k + 4 * m) + (k * n + 4 * n) + 2 * m * n
    assert bk.traffic_bytes("fp8", m, k, n, k * n + 4 * n) == bk.traffic_bytes("w8a8", m, k, n, k * n + 4 * n)
    # +quant: read bf16 x, write int8 x and scales, read them back in the matmul
    quant = bk.traffic_bytes("w8a8+quant", m, k, n, k * n + 4 * n)
    assert quant == 2 * m * k + 2 * (m * k + 4 * m) + (k * n + 4 * n) + 2 * m * n
    for family in ("bf16", "int8", "fp8"):
        w = jax.eval_shape(lambda key, f=family: bk.make_weights(f, key, k, n), jax.random.key(0))
        kernel = {"bf16": "bf16", "int8": "w8a8", "fp8": "fp8"}[family]
        assert bk.tree_nbytes(w) == bk.nominal_weight_bytes(kernel, k, n)


def test_roofline_and_device_table():
    assert H100 is not None and H100.bandwidth == 3.35e12
    h200 = bk.device_peaks("NVIDIA H200")
    assert h200 is not None and h200.bandwidth == 4.8e12 and h200.flops["bf16"] == 989e12
    for kind in ("cpu", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB"):
        assert bk.device_peaks(kind) is None
    assert bk.roofline_seconds("bf16", 10**15, 10**9, None) is None
    # M = 4096, 8192 x 8192: compute bound; int8 runs against the int8 peak, w4a16 against bf16's
    m, k, n = 4096, 8192, 8192
    flops = bk.matmul_flops(m, k, n)
    nbytes = bk.traffic_bytes("w8a8", m, k, n, k * n + 4 * n)
    assert bk.roofline_seconds("w8a8", flops, nbytes, H100) == pytest.approx(flops / 1979e12)
    assert bk.roofline_seconds("w4a16", flops, nbytes, H100) == pytest.approx(flops / 989e12)


def test_copies_exceed_l2_within_the_weight_limit():
    assert bk.num_copies(32 * 2**20) * 32 * 2**20 >= bk.COPY_TARGET_BYTES > bk.L2_BYTES
    assert bk.num_copies(10**6) == bk.MAX_COPIES
    assert bk.num_copies(940 * 2**20) == 2
    assert bk.num_copies(3 * 2**30) == 1  # two copies would exceed the 4 GiB per program
    assert bk.num_copies(10**6, fixed=3) == 3


def test_crossover_on_synthetic_speedups():
    assert bk.crossover({1: 3.0, 16: 2.5, 64: 1.4, 256: 0.9, 1024: 0.6, 4096: 0.5}) == 256
    assert bk.crossover({4096: 0.5, 1: 3.0, 1024: 1.2, 256: 0.99}) == 256  # unordered input
    assert bk.crossover({1: 3.0, 16: 1.01}) == "none"
    assert bk.crossover({1: 0.8, 16: 1.2}) == 1  # smallest M that loses, even if a larger M wins
    assert bk.crossover({1: None, 16: 1.5, 64: None}) == "none"  # unmeasured cells are skipped
    assert bk.crossover({1: None}) == "-"


def test_speedups_and_crossovers_from_synthetic_timings():
    ms = (1, 16, 256)
    config = bk.Config(("bf16", "w4a16", "fp8"), (("s", 64, 64),), ms, 1, "reference", 2, None)
    sweep = bk.Sweep(config, {}, None)
    times = {"bf16": (10.0, 12.0, 20.0), "w4a16": (4.0, 6.0, 25.0), "fp8": (5.0, 6.0, 10.0)}
    sweep.cells = [
        {"kernel": kern, "shape": "s", "m": m, "time_s": t}
        for kern, ts in times.items()
        for m, t in zip(ms, ts, strict=True)
    ]
    bk.add_speedups(sweep.cells)
    rows = {r["kernel"]: r for r in bk.crossovers(sweep)}
    assert rows["w4a16"]["speedups"] == {1: 2.5, 16: 2.0, 256: 0.8}
    assert rows["w4a16"]["crossover"] == 256
    assert rows["fp8"]["crossover"] == "none"
    assert "bf16" not in rows
    table = bk.compact_table(sweep)
    assert "2.50x" in table and table.splitlines()[-1].endswith("none")


def test_quick_cpu_smoke_run(tmp_path, capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("the smoke run checks the CPU reference path")
    out = tmp_path / "results.json"
    assert bk.main(["--quick", "--repeats", "3", "--out", str(out), "--md", str(tmp_path / "r.md")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md", "results.json"]  # no temp files left
    result = json.loads(out.read_text())
    assert result["meta"]["backend"] == "reference" and result["stopped"] is None
    cells = {(c["kernel"], c["shape"], c["m"]): c for c in result["cells"]}
    run = [k for k in bk.KERNELS if k not in bk.HOPPER_KERNELS]  # Mosaic GPU rows: gpu backend only
    assert result["meta"]["skipped_kernels"] == [
        f"{k} (Mosaic GPU: runs with backend gpu only)" for k in bk.HOPPER_KERNELS
    ]
    wanted = {
        (k, s, m) for k in run for s in bk.QUICK_CPU.shapes for m in bk.QUICK_CPU.m if m <= bk.MAX_M.get(k, m)
    }
    assert ("w8a8-split1", "tiny.a", 16) in wanted and ("w8a8-split1", "tiny.a", 64) not in wanted
    assert set(cells) == wanted
    for cell in cells.values():
        assert "error" not in cell, cell
        assert cell["time_s"] > 0 and cell["gbps"] > 0 and cell["speedup"] > 0
        assert cell["roofline_pct"] is None  # CPU: no peaks
    xla_rows = [c for c in cells.values() if c["kernel"] in bk.XLA_KERNELS]  # XLA's int8 / fp8 dot
    assert len(xla_rows) == 2 * len(bk.QUICK_CPU.shapes) * len(bk.QUICK_CPU.m)
    assert all(c["speedup"] > 0 for c in xla_rows)
    assert "the -xla rows: XLA's native int8 / fp8 dot" in result["meta"]["backend_note"]
    assert {(r["kernel"], r["shape"]) for r in result["crossover"]} == {
        (k, s) for k in run[1:] for s in bk.QUICK_CPU.shapes
    }
    printed = capsys.readouterr().out
    assert "reference" in printed.splitlines()[0] and "NOT the Pallas kernels" in printed.splitlines()[0]
    assert printed.rstrip().splitlines()[-1].startswith("fp8")  # the compact table comes last
    assert "| crossover M |" in (tmp_path / "r.md").read_text()


def test_time_budget_stops_cleanly(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bk.main(["--quick", "--time-budget-s", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cells"] == [] and "time budget" in result["stopped"]
    assert (tmp_path / "r.md").exists()
    assert "stopped: time budget" in capsys.readouterr().out


def test_interpret_runs_the_pallas_kernels(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--interpret", "--kernels", "w8a8", "--shapes", "tiny.a", "--m", "16", "--repeats", "1"]
    assert bk.main([*argv, "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert [(c["kernel"], c["m"]) for c in cells] == [("bf16", 16), ("w8a8", 16)]
    assert all("error" not in c and c["time_s"] > 0 for c in cells)


def test_device_clock_sweep_records_cupti_kernels(tmp_path, monkeypatch, capsys):
    """The sweep on the device clock, with a stand-in for jax's CUPTI profiler: each program's time is
    the sum of its recorded kernels over R, and the cells list the kernels."""
    programs_timed = []

    def measure(f, *, aggregate, iterations):
        def wrapper(*args):
            programs_timed.append(len(args) - 1)  # R weight copies follow x
            copies = len(args) - 1
            its = [[("matmul", 0.010)] * copies + [("reduce", 0.004)] for _ in range(iterations)]
            return f(*args), its

        return wrapper

    monkeypatch.setattr(bk.timing, "cupti_measure", lambda: measure)
    monkeypatch.setattr(bk.timing, "device_clock_problem", lambda platform, m=None: None)
    out = tmp_path / "r.json"
    argv = ["--quick", "--kernels", "w8a8", "--shapes", "tiny.a", "--m", "1,16", "--clock", "device"]
    assert bk.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["clock"] == "device" and "CUPTI" in result["meta"]["method"]
    assert len(result["cells"]) == 4 and programs_timed == [2] * 4
    for cell in result["cells"]:
        assert cell["clock"] == "device" and cell["copies"] == 2
        assert cell["time_s"] == pytest.approx((2 * 10 + 4) * 1e-6 / 2)
        assert cell["device_kernels"][0] == {"name": "matmul", "launches": 2, "us": pytest.approx(20.0)}
    assert "longest: matmul x2 83% of 2 kernels" in capsys.readouterr().out
    md = out.with_suffix(".md").read_text()
    assert "| w8a8 | tiny.a | 16 | 2 | `matmul` x2: 20.0; `reduce` x1: 4.0 |" in md


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("base", ["w8a8", "fp8"])
def test_nk_rows_compute_the_same_matmul(base, backend):
    """``-nk`` rows: the same weight values stored (N, K), the same outputs."""
    k, n, m = 256, 384, 16
    key = jax.random.key(3)
    family = bk.WEIGHT_FAMILY[base]
    w, w_nk = bk.make_weights(family, key, k, n), bk.make_weights(family + "-nk", key, k, n)
    assert w_nk[0].shape == (n, k) and bool((w_nk[0] == w[0].T).all())
    x = bk.make_activations(bk.ACT_FAMILY[base], jax.random.key(4), m, k)
    y, y_nk = bk.kernel_fn(base, backend)(x, w), bk.kernel_fn(base + "-nk", backend)(x, w_nk)
    assert y.shape == y_nk.shape == (m, n)
    scale = float(jnp.max(jnp.abs(y.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs((y - y_nk).astype(jnp.float32)))) <= 1e-2 * scale  # bf16 outputs
    assert bk.nominal_weight_bytes(base + "-nk", k, n) == bk.nominal_weight_bytes(base, k, n)
    assert bk.activation_bytes(base + "-nk", m, k) == bk.activation_bytes(base, m, k)


@pytest.mark.parametrize("base", ["w8a8", "fp8"])
def test_split1_rows_call_one_k_range(base, monkeypatch):
    """``-split1`` rows pass ``split_k=1`` to the kernel (none to the reference), on the same operands."""
    import qjax.kernels.fp8 as fp8_mod
    import qjax.kernels.w8a8 as w8a8_mod

    mod, name = (w8a8_mod, "w8a8_matmul") if base == "w8a8" else (fp8_mod, "fp8_matmul")
    seen = []
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    k, n, m = 256, 128, 16
    w = bk.make_weights(bk.WEIGHT_FAMILY[base], jax.random.key(5), k, n)
    x = bk.make_activations(bk.ACT_FAMILY[base], jax.random.key(6), m, k)
    y = bk.kernel_fn(base, "interpret")(x, w)
    y1 = bk.kernel_fn(base + "-split1", "interpret")(x, w)
    assert [kw.get("split_k") for kw in seen] == [None, 1]
    assert bk.WEIGHT_FAMILY[base + "-split1"] == bk.WEIGHT_FAMILY[base] and bk.MAX_M[base + "-split1"] == 16
    np.testing.assert_array_equal(
        np.asarray(y1, np.float32), np.asarray(y, np.float32)
    )  # one range either way
    ref = bk.kernel_fn(base, "reference")(x, w)  # the references take no split_k
    np.testing.assert_array_equal(
        np.asarray(bk.kernel_fn(base + "-split1", "reference")(x, w), np.float32), np.asarray(ref, np.float32)
    )


@pytest.mark.parametrize("kernel", ["w8a8-xla", "fp8-xla"])
def test_xla_rows_compute_the_scaled_low_precision_product(kernel):
    """``w8a8-xla`` / ``fp8-xla`` (XLA's int8 / fp8 dot, the same on every backend) on the operands of
    ``w8a8`` / ``fp8``: ``x_scale * w_scale * (x_q @ w_q)`` in float64 (the int8 product exact, the
    e4m3 values upcast), within the bf16 rounding of the output and the f32 accumulation of fp8."""
    k, n, m = 256, 384, 16
    base = kernel.removesuffix("-xla")
    w_q, w_scale = bk.make_weights(bk.WEIGHT_FAMILY[kernel], jax.random.key(7), k, n)
    x_q, x_scale = bk.make_activations(bk.ACT_FAMILY[kernel], jax.random.key(8), m, k)
    assert (bk.WEIGHT_FAMILY[kernel], bk.ACT_FAMILY[kernel]) == (bk.WEIGHT_FAMILY[base], bk.ACT_FAMILY[base])
    assert w_q.shape == (k, n) and w_scale.shape == (1, n) and x_scale.shape == (m, 1)
    y = bk.kernel_fn(kernel, "reference")((x_q, x_scale), (w_q, w_scale))
    assert y.dtype == jnp.bfloat16 and y.shape == (m, n)
    if base == "w8a8":
        product = (np.asarray(x_q, np.int64) @ np.asarray(w_q, np.int64)).astype(np.float64)
    else:
        product = np.asarray(x_q).astype(np.float64) @ np.asarray(w_q).astype(np.float64)
    scales = np.asarray(x_scale, np.float64) * np.asarray(w_scale, np.float64)
    want = scales * product
    magnitude = scales * (
        np.abs(np.asarray(x_q).astype(np.float64)) @ np.abs(np.asarray(w_q).astype(np.float64))
    )
    bound = 2.0**-8 * np.abs(want) + (k + 3) * 2.0**-24 * magnitude  # bf16 output; f32 sums and scaling
    err = np.abs(np.asarray(y, np.float64) - want)
    assert np.all(err <= bound), float(np.max(err - bound))
    assert float(np.max(np.abs(want))) > 0.1  # not a trivially small output
    assert bk.kernel_fn(kernel, "gpu")((x_q, x_scale), (w_q, w_scale)).dtype == jnp.bfloat16  # XLA anywhere
    assert bk.nominal_weight_bytes(kernel, k, n) == bk.nominal_weight_bytes(base, k, n)
    assert bk.activation_bytes(kernel, m, k) == bk.activation_bytes(base, m, k) == m * k + 4 * m
    assert bk.ARITHMETIC[kernel] == bk.ARITHMETIC[base] and bk.MODULES[kernel] == ("xla",)


def test_xla_programs_compile_one_at_a_time_first():
    """The programs XLA autotunes on the device (bf16 and the -xla rows) compile alone, before the
    Pallas programs compile on the worker threads."""
    order: list[str] = []

    class Lowered:
        def __init__(self, kernel: str):
            self.kernel = kernel

        def compile(self) -> str:
            order.append(self.kernel)
            return self.kernel

    kernels = ("w8a8", "fp8-xla", "bf16", "fp8", "w8a8-xla")
    cells = {k: {"kernel": k} for k in kernels}
    compiled = bk.compile_cells({k: Lowered(k) for k in kernels}, cells, workers=4)
    assert compiled == {k: k for k in kernels}
    assert order[:3] == ["bf16", "w8a8-xla", "fp8-xla"] and set(order[3:]) == {"w8a8", "fp8"}
    assert all(c["compile_s"] >= 0 for c in cells.values())


def test_bad_arguments():
    if jax.default_backend() != "gpu":
        with pytest.raises(SystemExit, match=r"--clock device: the device clock \(CUPTI\) needs a GPU"):
            bk.make_config(bk.parse_args(["--clock", "device"]))
    with pytest.raises(SystemExit, match="unknown"):
        bk.parse_shapes("7b.qkv,nope")
    with pytest.raises(SystemExit, match="unknown"):
        bk.parse_kernels("w8a8,int3")
    assert bk.parse_shapes("llama2-7b,7b.o,128x256")[-1] == ("128x256", 128, 256)
    assert len(bk.parse_shapes("all")) == 8
    assert bk.parse_kernels("fp8") == ("bf16", "fp8")
    assert bk.nominal_weight_bytes("w8a8-mgpu", 64, 32) == bk.nominal_weight_bytes("w8a8", 64, 32)
    assert bk.activation_bytes("fp8-mgpu", 4, 64) == bk.activation_bytes("fp8", 4, 64)
    assert bk.activation_bytes("w4a16-mgpu", 4, 64) == bk.activation_bytes("w4a16", 4, 64)
    w4h = bk.make_weights("w4-hopper", jax.random.key(0), 256, 128)
    assert bk.tree_nbytes(w4h) == 128 * 1024 // 2 + 8 * 128 * 4  # int4 codes counted at 4 bits


@pytest.mark.parametrize("kernel", bk.HOPPER_KERNELS)
def test_mosaic_gpu_programs_lower_for_cuda(kernel, lowered):
    k, n, m = 512, 384, 64
    weights = [bk.make_weights(bk.WEIGHT_FAMILY[kernel], jax.random.key(r), k, n) for r in range(2)]
    x = bk.make_activations(bk.ACT_FAMILY[kernel], jax.random.key(9), m, k)
    # (N, K), N padded to the CTA tile (256 or 128 columns; K to 8 groups of 128 for int4 weights)
    assert weights[0][0].shape == ((384, 1024) if kernel == "w4a16-mgpu" else (512, 512))
    program = jax.jit(bk.build_program(bk.kernel_fn(kernel, "gpu")))
    assert "mosaic_gpu" in lowered(program, x, *weights, platform="cuda")


def test_w4a16_swap_row():
    """``w4a16-swap`` computes the ``w4a16`` matmul with swapped tiles; TPU runs skip it."""
    k, n, m = 256, 256, 16
    w = bk.make_weights("w4", jax.random.key(5), k, n)
    x = bk.make_activations("bf16", jax.random.key(6), m, k)
    y, y_swap = bk.kernel_fn("w4a16", "interpret")(x, w), bk.kernel_fn("w4a16-swap", "interpret")(x, w)
    scale = float(jnp.max(jnp.abs(y.astype(jnp.float32))))
    assert float(jnp.max(jnp.abs((y - y_swap).astype(jnp.float32)))) <= 1e-2 * scale  # bf16 outputs
    assert bk.nominal_weight_bytes("w4a16-swap", k, n) == bk.nominal_weight_bytes("w4a16", k, n)
    config = bk.make_config(bk.parse_args(["--backend", "tpu", "--kernels", "w4a16,w4a16-swap"]))
    assert config.kernels == ("bf16", "w4a16")
    assert config.skipped == ("w4a16-swap (swap_ab: an option of the GPU kernel)",)


def test_goals_from_synthetic_timings():
    """The best row at each M, the worst of those against the target, Pallas rows apart from XLA's
    dot; GPU sweeps only."""
    ms = (1, 16, 1024, 4096)
    kernels = ("bf16", "w4a16", "w4a16-swap", "w8a8", "w8a8-nk", "w8a8-xla")
    config = bk.Config(kernels, (("s", 64, 64),), ms, 1, "gpu", 2, None)
    sweep = bk.Sweep(config, {}, None)
    times = {  # us per call; bf16 / t = speedup
        "bf16": (30.0, 30.0, 100.0, 400.0),
        "w4a16": (10.0, 12.0, 400.0, 1600.0),  # 3.0x, 2.5x
        "w4a16-swap": (12.0, 9.0, 400.0, 1600.0),  # 2.5x, 3.33x
        "w8a8": (20.0, 20.0, 80.0, 400.0),  # at M >= 1024: 1.25x, 1.0x
        "w8a8-nk": (20.0, 20.0, 50.0, 320.0),  # 2.0x, 1.25x
        "w8a8-xla": (20.0, 20.0, 60.0, 200.0),  # 1.67x, 2.0x
    }
    sweep.cells = [
        {"kernel": kern, "shape": "s", "m": m, "time_s": 1e-6 * t, **_FILLER}
        for kern, ts in times.items()
        for m, t in zip(ms, ts, strict=True)
    ]
    bk.add_speedups(sweep.cells)
    rows = {r["goal"].split()[0]: r for r in bk.goal_rows(sweep)}
    assert set(rows) == {"W4A16", "W8A8"}  # no FP8 cells measured
    w4 = rows["W4A16"]
    assert w4["goal"] == "W4A16 at M <= 16 >= 3x bf16"
    assert {m: b["kernel"] for m, b in w4["pallas"]["best"].items()} == {1: "w4a16", 16: "w4a16-swap"}
    assert w4["pallas"]["worst"] == pytest.approx(3.0) and w4["pallas"]["worst_m"] == 1 and w4["met"]
    assert w4["with_xla"] is None and w4["met_with_xla"] is None
    w8 = rows["W8A8"]
    assert w8["goal"] == "W8A8 at M >= 1024 >= 1.5x bf16"
    assert w8["pallas"]["worst"] == pytest.approx(1.25) and w8["pallas"]["worst_m"] == 4096 and not w8["met"]
    best = {m: b["kernel"] for m, b in w8["with_xla"]["best"].items()}
    assert best == {1024: "w8a8-nk", 4096: "w8a8-xla"}  # 2.0x at both
    assert w8["with_xla"]["worst"] == pytest.approx(2.0) and w8["met_with_xla"]
    text = bk.goals_text(sweep)
    assert "W8A8 at M >= 1024 >= 1.5x bf16, s: Pallas 1.25x at M=4096 NOT met" in text
    assert "with XLA's dot 2.00x met" in text
    md = bk.markdown(dataclasses.replace(sweep, meta=_META))
    w4_row = (
        "| W4A16 at M <= 16 >= 3x bf16 | s | M=1: w4a16 3.00x; M=16: w4a16-swap 3.33x | 3.00x | yes | - | - |"
    )
    assert w4_row in md
    goals = json.loads(json.dumps(bk.payload(sweep)["goals"]))
    assert goals[1]["with_xla"]["best"]["4096"]["kernel"] == "w8a8-xla"
    reference = dataclasses.replace(sweep, config=dataclasses.replace(config, backend="reference"))
    assert bk.goal_rows(reference) == [] and bk.goals_text(reference) == ""


_FILLER = {"k": 64, "n": 64, "tflops": 1.0, "gbps": 1.0, "roofline_pct": None, "copies": 2}  # markdown
_META = {
    "device_kind": "test",
    "platform": "gpu",
    "backend": "gpu",
    "jax_version": "0",
    "method": "synthetic",
}
