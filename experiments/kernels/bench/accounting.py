"""What a cell's time means: FLOPs, bytes moved, roofline, speedup over bf16 and the crossover M
(the accounting of the package docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from experiments.kernels.bench.rows import (
    ACT_FAMILY,
    ARITHMETIC,
    BASELINE,
    GROUP_SIZE,
    KERNELS,
    WEIGHT_FAMILY,
)


@dataclasses.dataclass(frozen=True)
class Peaks:
    """Dense peak throughput of a device: FLOP/s per arithmetic and HBM bytes/s."""

    flops: Mapping[str, float]
    bandwidth: float


_HOPPER_FLOPS = {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12}
# (substrings the device_kind must contain, substrings it must not contain, peaks)
DEVICE_PEAKS: tuple[tuple[tuple[str, ...], tuple[str, ...], Peaks], ...] = (
    (("H100", "HBM3"), ("PCIe", "NVL"), Peaks(_HOPPER_FLOPS, 3.35e12)),  # "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), (), Peaks(_HOPPER_FLOPS, 3.35e12)),
    (("H200",), ("NVL",), Peaks(_HOPPER_FLOPS, 4.8e12)),
)


def device_peaks(device_kind: str) -> Peaks | None:
    """The peaks of ``device_kind`` from :data:`DEVICE_PEAKS`, ``None`` if it is not listed."""
    for need, avoid, peaks in DEVICE_PEAKS:
        if all(s in device_kind for s in need) and not any(s in device_kind for s in avoid):
            return peaks
    return None


def matmul_flops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def activation_bytes(kernel: str, m: int, k: int) -> int:
    """Bytes of activation traffic per call (see the package docstring)."""
    if kernel not in ACT_FAMILY:
        raise ValueError(f"unknown kernel {kernel!r}; kernels: {KERNELS}")
    quantized = m * k + 4 * m  # int8 / fp8 values and one f32 scale per token
    if kernel == "w8a8+quant":
        return 2 * m * k + 2 * quantized
    return 2 * m * k if ACT_FAMILY[kernel] == "bf16" else quantized


def nominal_weight_bytes(
    kernel: str, k: int, n: int, *, group_size: int = GROUP_SIZE, scale_itemsize: int = 4, zeros: bool = False
) -> int:
    """Bytes of one weight copy of ``kernel`` with no padding: values, scales (and zeros)."""
    family = WEIGHT_FAMILY[kernel]
    if family == "bf16":
        return 2 * k * n
    if family.split("-")[0] in ("int8", "fp8"):  # also stored (N, K) or prepared for the Hopper kernels
        return k * n + 4 * n
    groups = -(-k // group_size) * n
    return k * n // 2 + groups * scale_itemsize * (2 if zeros else 1)


def traffic_bytes(kernel: str, m: int, k: int, n: int, weight_bytes: int) -> int:
    """Bytes moved by one call: activations + one weight copy (``weight_bytes``) + the bf16 output."""
    return activation_bytes(kernel, m, k) + weight_bytes + 2 * m * n


def roofline_seconds(kernel: str, flops: int, nbytes: int, peaks: Peaks | None) -> float | None:
    """``max(bytes / peak_bw, flops / peak_flops)`` for ``kernel``'s arithmetic; None without peaks."""
    if peaks is None:
        return None
    return max(nbytes / peaks.bandwidth, flops / peaks.flops[ARITHMETIC[kernel]])


def add_metrics(cell: dict[str, Any], peaks: Peaks | None) -> None:
    """FLOPs, bytes, TFLOP/s, GB/s and roofline fields of a measured cell."""
    m, k, n, kernel = cell["m"], cell["k"], cell["n"], cell["kernel"]
    flops = matmul_flops(m, k, n)
    nbytes = traffic_bytes(kernel, m, k, n, cell["weight_bytes"])
    roof = roofline_seconds(kernel, flops, nbytes, peaks)
    t = cell["time_s"]
    cell.update(flops=flops, bytes=nbytes, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9)
    cell.update(roofline_s=roof, roofline_pct=None if roof is None else 100.0 * roof / t)


def add_speedups(cells: list[dict[str, Any]]) -> None:
    """``speedup = t_bf16 / t`` for every cell whose bf16 cell (same shape and M) was measured."""
    base = {(c["shape"], c["m"]): c.get("time_s") for c in cells if c["kernel"] == BASELINE}
    for c in cells:
        t_base = base.get((c["shape"], c["m"]))
        c["speedup"] = t_base / c["time_s"] if t_base and c.get("time_s") else None


def crossover(speedups: Mapping[int, float | None]) -> int | str:
    """The smallest M whose speedup is < 1, ``"none"`` if every measured M wins, ``"-"`` if none
    was measured (``None`` values are unmeasured cells)."""
    measured = sorted((m, s) for m, s in speedups.items() if s is not None)
    if not measured:
        return "-"
    return next((m for m, s in measured if s < 1.0), "none")
