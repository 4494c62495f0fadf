"""The quickstart demo: real weights load, and its error table computes what it claims."""

import itertools
import math

import ml_dtypes
import numpy as np
import pytest

import qjax
from experiments.scripts import demo_numerics
from tests.numerics.test_reference import MX_ELEMENTS, mx_exponent


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


def test_mx_rule_table_matches_float64_reference():
    """SQNR and clipped blocks of both MX exponent rules against numpy: S = 2^k (exact), values
    cast with ml_dtypes; a block clips when an element rounds above fmax (rounding y / 2 onto the
    same grid one binade lower, where it is representable, and doubling is exact)."""
    samples = demo_numerics.mx_samples(32 * 64)
    rows = demo_numerics.mx_rule_table(samples)
    assert [(r["data"], r["format"], r["rule"]) for r in rows] == list(
        itertools.product(demo_numerics.MX_DISTRIBUTIONS, demo_numerics.MX_FORMATS, demo_numerics.MX_RULES)
    )
    for row in rows:
        element, emax = MX_ELEMENTS[row["format"]]
        fmax = float(ml_dtypes.finfo(element).max)
        x = samples[row["data"]].astype(np.float64)
        scale = np.exp2(mx_exponent(np.abs(x).max(axis=-1, keepdims=True), emax, fmax, row["rule"]))
        y = x / scale
        x_hat = np.clip(y, -fmax, fmax).astype(element).astype(np.float64) * scale
        sqnr = 10 * math.log10(np.sum(x**2) / np.sum((x - x_hat) ** 2))
        assert row["sqnr_db"] == pytest.approx(sqnr, abs=1e-4)
        rounded = 2 * (y / 2).astype(element).astype(np.float64)
        clipped = np.mean(np.any(np.abs(rounded) > fmax, axis=-1))
        assert row["clipped_blocks"] == clipped
        assert (clipped == 0) == (row["rule"] == "ceil")
