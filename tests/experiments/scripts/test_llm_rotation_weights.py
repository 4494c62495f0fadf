"""experiments.scripts.llm_rotation_weights on a tiny random Llama: the rotation is exact in float64,
it lowers the per-channel RTN error of weights with outlier entries, the synthetic-token error of the
rotated readers grows with the energy in a near-zero-gain channel, and weights on a Q4_1 grid are
reproduced by the Q4_1-grid quantizer; the quantizers against float64 numpy references."""

import flax.nnx as nnx
import numpy as np
import pytest

from experiments.scripts import llm_rotation_weights as rw
from experiments.scripts.llm_cli import report_rows
from qjax.models import Llama, LlamaConfig

CONFIG = LlamaConfig(
    vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=32
)
FRACTIONS = (0.0, 0.5, 0.9, 0.99)


def _random_weights(rng, *, outliers=False, weak_channel=None):
    """Normal(0, 0.02) kernels and embedding, norm gains uniform in [0.5, 2]; ``outliers``: 1% of
    the entries of every kernel times 10; ``weak_channel``: that gain of every RMSNorm set to 1e-4."""
    abstract = nnx.eval_shape(lambda: Llama(CONFIG, rngs=nnx.Rngs(0)))
    params = [(p, n) for p, n in nnx.iter_graph(abstract) if isinstance(n, nnx.Param)]
    w = {}
    for path, param in params:
        name = "/".join(map(str, path))
        if name.endswith("norm/weight"):
            g = rng.uniform(0.5, 2.0, param.shape)
            if weak_channel is not None and name != "norm/weight":
                g[weak_channel] = 1e-4
            w[name] = g.astype(np.float32)
        else:
            w[name] = 0.02 * rng.standard_normal(param.shape)
            if outliers and name.endswith("kernel"):
                w[name] *= np.where(rng.random(param.shape) < 0.01, 10.0, 1.0)
            w[name] = w[name].astype(np.float32)
    return w


def _q4_1_reference(w, group=32):
    n, m = w.shape
    blocks = w.reshape(n // group, group, m)
    low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    step = np.where(high > low, (high - low) / 15, 1.0)
    return (low + np.clip(np.round((blocks - low) / step), 0, 15) * step).reshape(n, m)


def test_quantizers_match_float64_references():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48))
    np.testing.assert_allclose(rw.q4_1_rtn(w), _q4_1_reference(w), rtol=0, atol=1e-5)
    scale = np.abs(w).max(axis=0) / 7
    per_channel = np.clip(np.round(w / scale), -7, 7) * scale
    np.testing.assert_allclose(rw.rtn(w, rw.PER_CHANNEL), per_channel, rtol=0, atol=1e-5)
    z = w - w.mean(axis=0)
    np.testing.assert_allclose(rw.column_kurtosis(w), (z**4).mean(0) / (z**2).mean(0) ** 2, rtol=1e-12)
    blocks = w.copy()
    blocks[:32, 0] = np.repeat([1.0, 2.0, 3.0, 4.0], 8)
    assert rw.distinct_per_block(blocks, axis=0)[0, 0] == 4
    assert rw.distinct_per_block(blocks, axis=0)[1, 0] == 32


def test_rotated_layers_reproduce_the_originals():
    v = rw.weight_variants(CONFIG, _random_weights(np.random.default_rng(1)), seed=3)
    deviation = rw.rotation_deviation(CONFIG, v)
    assert set(deviation) == set(rw.LINEARS)
    assert max(deviation.values()) < 1e-10


def test_rotation_lowers_the_weight_error_of_outlier_entries():
    v = rw.weight_variants(CONFIG, _random_weights(np.random.default_rng(2), outliers=True))
    rows = rw.weight_rows(CONFIG, v)
    assert len(rows) == CONFIG.n_layers * len(rw.LINEARS)
    for r in rows:
        assert r["error_rotated"] < r["error_original"], r
        assert r["peak_rotated"] < r["peak_original"]
    assert rw.model_error(rows, "rotated") < 0.8 * rw.model_error(rows, "original")
    writer = [r for r in rows if r["linear"] in rw.WRITERS]
    assert all(r["error_fused"] == r["error_original"] for r in writer)


def test_synthetic_token_error_grows_with_the_weak_channel_energy():
    weights = _random_weights(np.random.default_rng(3), weak_channel=11)
    v = rw.weight_variants(CONFIG, weights)
    assert {(g["norm"], g["channel"]) for g in rw.gain_rows(CONFIG, weights)} == {
        ("attn_norm", 11),
        ("mlp_norm", 11),
    }
    rows = rw.token_rows(CONFIG, v, FRACTIONS, n_tokens=16)
    for linear in rw.READERS["attn_norm"] + rw.READERS["mlp_norm"]:
        mean = {
            (f, kind): np.mean([r[kind] for r in rows if r["linear"] == linear and r["fraction"] == f])
            for f in FRACTIONS
            for kind in ("unrotated", "rotated")
        }
        rotated = [mean[f, "rotated"] for f in FRACTIONS]
        assert np.all(np.diff(rotated) > 0), (linear, rotated)
        assert mean[0.99, "rotated"] > 5 * mean[0.99, "unrotated"]
        assert mean[0.99, "unrotated"] < 2 * mean[0.0, "unrotated"]


def test_weights_on_a_q4_1_grid_are_reproduced():
    rng = np.random.default_rng(4)
    weights = _random_weights(rng)
    for name, w in weights.items():
        if name.startswith("layers/") and name.endswith("kernel"):
            n, m = w.shape
            codes = rng.integers(0, 16, (n // 32, 32, m))
            codes[:, 0], codes[:, 1] = 0, 15
            step = rng.uniform(0.001, 0.01, (n // 32, 1, m))
            low = rng.uniform(-0.1, -0.02, (n // 32, 1, m))
            weights[name] = (low + step * codes).reshape(n, m).astype(np.float32)
    rows = rw.weight_rows(CONFIG, rw.weight_variants(CONFIG, weights))
    for r in rows:
        assert r["distinct_max"] <= 16
        assert r["q4_1_original"] < 1e-6, r
        assert r["q4_1_rotated"] > 0.02
        assert r["error_original"] > 0.02


def test_report_markdown_and_files(tmp_path, capsys):
    weights = _random_weights(np.random.default_rng(5), weak_channel=2)
    report = rw.weights_report(CONFIG, weights, fractions=(0.0, 0.9), n_tokens=8)
    rows, text = rw.report_markdown(report, source="tiny: ")
    for heading in ("## 1. int4", "## 2. The Q4_1 grid", "## 3. Near-zero"):
        assert heading in text
    assert "| all linears |" in text and "| 0.9 |" in text
    assert sum(r["table"] == "weights" for r in rows) == len(rw.LINEARS) + 1
    markdown, json_file = tmp_path / "out.md", tmp_path / "out.json"
    assert report_rows(rows, text, markdown) == 0
    assert markdown.read_text() == text
    report_rows(rows, text, json_file)
    assert '"rows"' in json_file.read_text()
    assert capsys.readouterr().out == text + text


def test_widths_that_blocks_of_32_do_not_divide_are_refused():
    rw.check_widths(CONFIG)
    with pytest.raises(ValueError, match=r"hidden_dim=80 is not a multiple of 32"):
        rw.check_widths(LlamaConfig(vocab_size=8, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=80))
    with pytest.raises(ValueError, match=r"n_kv_heads \* head_dim=16 is not a multiple of 32"):
        rw.check_widths(LlamaConfig(vocab_size=8, dim=64, n_layers=1, n_heads=4, n_kv_heads=1, hidden_dim=96))
