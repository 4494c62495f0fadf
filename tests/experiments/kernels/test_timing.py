"""experiments.kernels.timing: the device clock's arithmetic over CUPTI records, the clock choice,
the wall clock."""

from __future__ import annotations

import json
import statistics

import jax
import jax.numpy as jnp
import pytest

from experiments.kernels import timing


def fake_measure(per_iteration, calls=None):
    """A stand-in for jax's CUPTI ``measure``: runs ``f`` once and returns ``per_iteration(i)`` as the
    kernel records ``[(name, ms), ...]`` of execution ``i``, shaped as jax returns them."""

    def measure(f, *, aggregate, iterations):
        assert aggregate is False

        def wrapper(*args):
            out = f(*args)
            if calls is not None:
                calls.append(iterations)
            records = [per_iteration(i) for i in range(iterations)]
            return out, records[0] if iterations == 1 else records

        return wrapper

    return measure


def _compiled():
    x = jnp.ones((4, 8), jnp.float32)
    return jax.jit(lambda a: a.sum()).lower(x).compile(), (x,)


def test_device_time_is_the_median_kernel_sum_per_copy():
    # execution i: a matmul kernel of (10 + i) us launched 4 times, a reduction of 3 us once
    def records(i):
        return [("gemm_kernel", (10 + i) * 1e-3)] * 4 + [("reduce_fusion", 3e-3)]

    compiled, args = _compiled()
    calls = []
    t = timing.time_device(compiled, args, copies=4, repeats=5, measure=fake_measure(records, calls))
    samples = [(4 * (10 + i) + 3) * 1e-6 / 4 for i in range(5)]
    assert calls == [5]
    assert t.clock == "device" and t.repeats == 5 and t.launches == 1
    assert t.seconds == pytest.approx(statistics.median(samples), rel=1e-12)
    assert t.min_seconds == pytest.approx(min(samples), rel=1e-12)
    q = statistics.quantiles(samples, n=4)
    assert t.spread == pytest.approx((q[2] - q[0]) / statistics.median(samples), rel=1e-12)
    assert t.kernels == [
        {"name": "gemm_kernel", "launches": 4, "us": pytest.approx(4 * 12.0)},
        {"name": "reduce_fusion", "launches": 1, "us": pytest.approx(3.0)},
    ]


def test_device_time_with_one_repeat_and_long_names():
    name = "k" * 300
    compiled, args = _compiled()
    t = timing.time_device(compiled, args, 2, 1, fake_measure(lambda i: [(name, 0.004), ("b", 0.002)]))
    assert t.seconds == pytest.approx(3e-6) and t.spread == 0.0 and t.repeats == 1
    assert t.kernels is not None and t.kernels[0]["name"] == name[: timing.NAME_CHARS]
    json.dumps(t.kernels)  # goes into results files as is


@pytest.mark.parametrize(
    ("records", "match"),
    [(lambda i: [], "no kernel"), (lambda i: [("a", 0.0)], "zero-length")],
)
def test_device_time_refuses_empty_records(records, match):
    compiled, args = _compiled()
    with pytest.raises(RuntimeError, match=match):
        timing.time_device(compiled, args, 1, 3, fake_measure(records))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        timing.time_device(compiled, args, 1, 0, fake_measure(records))


def test_breakdown_orders_by_time_and_counts_launches_of_the_first_execution():
    its = [[("a", 1.0), ("b", 2.0), ("a", 1.0)], [("a", 3.0), ("b", 2.0), ("a", 3.0)], [("a", 2), ("b", 5)]]
    rows = timing.kernel_breakdown(its)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[0] == {"name": "a", "launches": 2, "us": pytest.approx(1e3 * statistics.median([2, 6, 2]))}
    assert rows[1]["us"] == pytest.approx(1e3 * 2.0)


def test_choose_clock():
    ok = fake_measure(lambda i: [("k", 0.001)])

    def broken(f, *, aggregate, iterations):
        raise RuntimeError("CUPTI profiling is not supported on this platform")

    assert timing.choose_clock("wall", "gpu") == ("wall", None)
    assert timing.choose_clock("auto", "gpu", ok) == ("device", None)
    assert timing.choose_clock("device", "gpu", ok) == ("device", None)
    clock, why = timing.choose_clock("auto", "gpu", broken)
    assert clock == "wall" and "CUPTI failed: RuntimeError: CUPTI profiling is not supported" in why
    clock, why = timing.choose_clock("auto", "cpu")
    assert clock == "wall" and "needs a GPU" in why
    with pytest.raises(ValueError, match=r"needs a GPU; this is 'tpu'\. Use --clock wall"):
        timing.choose_clock("device", "tpu")
    with pytest.raises(ValueError, match=r"CUPTI failed.*Use --clock wall"):
        timing.choose_clock("device", "gpu", broken)
    with pytest.raises(ValueError, match="clock must be one of"):
        timing.choose_clock("events", "gpu")
    with pytest.raises(ValueError, match="resolve 'auto'"):
        timing.time_program("auto", *_compiled(), 1, 1)
    assert "fell back: why" in timing.describe("wall", "why")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks how jax's profiler fails without a GPU")
def test_jax_cupti_profiler_is_called_as_jax_defines_it():
    """Without a GPU, jax's own ``measure`` accepts our call and fails at run time, which the probe
    reports (a changed signature would fail with TypeError here instead)."""
    problem = timing.device_clock_problem("gpu", timing.cupti_measure())
    assert problem is not None and problem.startswith("CUPTI failed: RuntimeError")


def test_wall_clock_times_a_program():
    compiled, args = _compiled()
    t = timing.time_wall(compiled, args, copies=2, repeats=4)
    assert t.clock == "wall" and t.kernels is None
    assert 3 <= t.repeats <= 4 and 1 <= t.launches <= timing.MAX_LAUNCHES
    assert 0 < t.min_seconds <= t.seconds and t.spread >= 0


def test_a_program_the_device_clock_fails_on_is_timed_by_the_wall_clock(monkeypatch):
    def inconsistent(f, *, aggregate, iterations):
        def wrapper(*args):
            f(*args)
            raise RuntimeError("The number of kernel launches is not divisible by the number of iterations")

        return wrapper

    monkeypatch.setattr(timing, "cupti_measure", lambda: inconsistent)
    t = timing.time_program("device", *_compiled(), 1, 3)
    assert t.clock == "wall" and t.seconds > 0 and t.kernels is None
    assert t.note is not None and "device clock failed (The number of kernel launches" in t.note
