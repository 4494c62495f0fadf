"""experiments.kernels.bench.data: weight copies enough to exceed the L2 cache, within the
per-program limit."""

from __future__ import annotations

from experiments.kernels.bench.data import COPY_TARGET_BYTES, L2_BYTES, MAX_COPIES, num_copies


def test_copies_exceed_l2_within_the_weight_limit():
    assert num_copies(32 * 2**20) * 32 * 2**20 >= COPY_TARGET_BYTES > L2_BYTES
    assert num_copies(10**6) == MAX_COPIES
    assert num_copies(940 * 2**20) == 2
    assert num_copies(3 * 2**30) == 1  # two copies would exceed the 4 GiB per program
    assert num_copies(10**6, fixed=3) == 3
