"""The quickstart demo: real weights load, and its error table computes what it claims."""

import math

import numpy as np
import pytest

import qjax
from experiments.scripts import demo_numerics


@pytest.fixture(scope="module")
def weight():
    return demo_numerics.load_weight()


def test_real_weight_loads_as_in_out(weight):
    assert weight.shape == (384, 1536)
    assert weight.dtype == np.float32
    assert np.all(np.isfinite(weight))


def test_error_table_matches_float64_reference(weight):
    rows = (
        ("int8 per-channel", dict(dtype="int8", granularity="per_channel", axis=-1)),
        ("int4 g32", dict(dtype="int4", granularity="per_group", axis=0, group_size=32)),
    )
    results = demo_numerics.error_table(weight, rows)
    w = weight.astype(np.float64)
    # int8 per-channel by hand: S = max|w_col| / 127, q = round(w/S).
    s = np.abs(w).max(axis=0, keepdims=True) / 127
    w_hat = np.clip(np.round(w / s), -127, 127) * s
    want = 10 * math.log10(np.sum(w**2) / np.sum((w - w_hat) ** 2))
    assert results[0]["sqnr_db"] == pytest.approx(want, abs=1e-3)
    assert results[0]["bits_per_weight"] == pytest.approx(8 + 32 * 1536 / w.size)
    # int4 g32: 4 bits packed + one float32 scale per 32 weights = 5 bits per weight.
    assert results[1]["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert results[1]["sqnr_db"] < results[0]["sqnr_db"]


def test_every_row_is_a_valid_spec():
    for _, fields in demo_numerics.ROWS:
        qjax.QuantSpec(**fields)


def test_markdown_has_one_line_per_row():
    results = [{"quantizer": "x", "sqnr_db": 1.0, "bits_per_weight": 4.0, "max_abs_error": 0.5}]
    assert demo_numerics.to_markdown(results).count("\n") == 2
