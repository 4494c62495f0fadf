"""experiments.kernels.bench.programs: compilation order of a cell group."""

from __future__ import annotations

from experiments.kernels.bench.programs import compile_cells


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
    compiled = compile_cells({k: Lowered(k) for k in kernels}, cells, workers=4)
    assert compiled == {k: k for k in kernels}
    assert order[:3] == ["bf16", "w8a8-xla", "fp8-xla"] and set(order[3:]) == {"w8a8", "fp8"}
    assert all(c["compile_s"] >= 0 for c in cells.values())
