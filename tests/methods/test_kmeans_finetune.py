"""k-means centroid fine-tuning (Deep Compression): the centroid gradient is the per-cluster sum
of the weight gradients, every weight stays on a centroid, fine-tuning lowers the loss of a k-means
quantized MLP on digits, and the converted model stores packed indices plus the trained codebook
(serving equals qat; real storage and compression ratio)."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from experiments.tasks.digits import MLP, load_digits
from qjax import QuantSpec
from qjax.methods import kmeans_finetune
from qjax.nn import Rule
from qjax.nn.ops import CodebookIndices
from qjax.ste import codebook_weight

quantize = jax.jit(qjax.quantize, static_argnums=1)
quantize_dequantize = jax.jit(qjax.quantize_dequantize, static_argnums=1)
KM2 = QuantSpec(dtype="kmeans2", kmeans_iters=10)
KM3_CH = QuantSpec(dtype="kmeans3", granularity="per_channel", axis=-1, kmeans_iters=10)
KM4_ROWS = QuantSpec(dtype="kmeans4", granularity="per_channel", axis=0, kmeans_iters=10)


def finetune_rules(spec, path=".*"):
    return [Rule(path=path, weights=spec, weight_estimator="kmeans_finetune")]


def per_cluster_sums(grad, indices, spec, k):
    """float64 numpy: sum of grad over the elements of each block with each index."""
    grad, indices = np.asarray(grad, np.float64), np.asarray(indices)
    if spec.granularity == "per_tensor":
        return np.array([grad[indices == j].sum() for j in range(k)]).reshape((1,) * grad.ndim + (k,))
    axis = spec.axis % grad.ndim
    out = np.zeros((*[1 if a != axis else n for a, n in enumerate(grad.shape)], k))
    for c in range(grad.shape[axis]):
        g, i = np.take(grad, c, axis=axis), np.take(indices, c, axis=axis)
        idx = (0,) * axis + (c,) + (0,) * (grad.ndim - axis - 1)
        out[idx] = [g[i == j].sum() for j in range(k)]
    return out


# --- the math -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "k"), [(KM2, 4), (KM3_CH, 8), (KM4_ROWS, 16)], ids=["t2", "c3", "r4"])
def test_centroid_gradient_is_the_per_cluster_sum_of_weight_gradients(spec, k, rng):
    w = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)
    q = quantize(w, spec)
    centroids, indices = q.codebook, q.values
    x = jnp.asarray(rng.normal(size=(5, 24)), jnp.float32)

    def loss_of_weight(weight):  # a nonlinear loss: the weight gradient varies element by element
        return jnp.sum(jnp.tanh(x @ weight) ** 2)

    weight = codebook_weight(centroids, indices, spec)
    np.testing.assert_array_equal(weight, qjax.dequantize(q))
    grad_w = jax.jit(jax.grad(loss_of_weight))(weight)
    grad_c = jax.jit(jax.grad(lambda c: loss_of_weight(codebook_weight(c, indices, spec))))(centroids)
    ref = per_cluster_sums(grad_w, indices, spec, k)
    assert grad_c.shape == centroids.shape == ref.shape
    tol = 1e-6 * np.abs(np.asarray(grad_w, np.float64)).sum()
    np.testing.assert_allclose(grad_c, ref, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(
        kmeans_finetune.centroid_gradient(grad_w, indices, spec), ref, rtol=1e-5, atol=tol
    )
    assert np.count_nonzero(ref) > k // 2  # most clusters are populated and receive a gradient


def test_compression_ratio_formula_matches_the_stored_qarray(rng):
    for shape, spec in [((64, 32), KM2), ((64, 32), KM3_CH), ((32, 10), KM4_ROWS), ((7, 5), KM3_CH)]:
        q = quantize(jnp.asarray(rng.normal(size=shape), jnp.float32), spec)
        assert q.compression_ratio() == pytest.approx(
            kmeans_finetune.compression_ratio(shape, spec), rel=1e-12
        )
    # 64x32 kmeans3 per channel: 3 bits per index (32 per row = 12 bytes), 32 codebooks of 8 float32
    expected = 64 * 32 * 32 / (8 * (64 * 12 + 4 * 32 * 8))
    assert kmeans_finetune.compression_ratio((64, 32), KM3_CH) == pytest.approx(expected)


# --- the model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = load_digits(0)
    return (jnp.asarray(x_train), jnp.asarray(y_train)), (jnp.asarray(x_test), jnp.asarray(y_test))


def _xent(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@pytest.fixture(scope="module")
def float_mlp(digits):
    """A float MLP trained on digits (full batch)."""
    model = MLP(32, rngs=nnx.Rngs(0))
    step = qjax.training.make_train_step(_xent)
    optimizer = qjax.training.make_optimizer(model, optax.adam(1e-2))
    for _ in range(150):
        step(model, optimizer, digits[0])
    return model


def effective_kernels(q):
    return {path: codebook_weight(c, i, op.rule.weights) for path, (c, i), op in _with_ops(q)}


def _with_ops(q):
    books = kmeans_finetune.codebooks(q)
    return [(path, books[path], op) for path, _, op in qjax.nn.quantized_ops(q)]


def test_quantize_model_holds_centroids_and_fixed_indices(float_mlp):
    q = qjax.nn.quantize_model(float_mlp, finetune_rules(KM3_CH))
    for path, (centroids, indices), op in _with_ops(q):
        layer = getattr(float_mlp, path)
        kernel = layer.kernel[...]
        assert isinstance(op.centroids, nnx.Param) and isinstance(op.indices, CodebookIndices)
        assert centroids.shape == (1, kernel.shape[1], 8) and indices.shape == kernel.shape
        assert indices.dtype == jnp.uint8
        # before any training the qat kernel is PTQ k-means of the float kernel
        np.testing.assert_array_equal(
            codebook_weight(centroids, indices, KM3_CH), quantize_dequantize(kernel, KM3_CH)
        )
    trainable = {path[-1] for path, _ in nnx.to_flat_state(nnx.state(q, nnx.Param))}
    assert trainable == {"kernel", "bias", "centroids"}  # the indices are not trained


def test_centroid_gradients_of_the_model_are_the_summed_kernel_gradients(float_mlp, digits):
    q = qjax.nn.quantize_model(float_mlp, finetune_rules(KM2))
    batch = (digits[0][0][:64], digits[0][1][:64])
    grads = nnx.jit(nnx.grad(_xent))(q, batch)
    # reference: the float model with its kernels set to centroids[indices]
    ref_model = nnx.clone(float_mlp)
    for path, weight in effective_kernels(q).items():
        getattr(ref_model, path).kernel[...] = weight
    ref_grads = nnx.jit(nnx.grad(_xent))(ref_model, batch)
    for path, (_, indices), _ in _with_ops(q):
        g_c = grads[path]["dot_general"]["centroids"][...]
        g_w = ref_grads[path]["kernel"][...]
        ref = per_cluster_sums(g_w, indices, KM2, 4)
        np.testing.assert_allclose(g_c, ref, rtol=1e-5, atol=1e-6 * np.abs(np.asarray(g_w)).sum())
        assert np.abs(ref).max() > 0
        assert not np.any(grads[path]["kernel"][...])  # the float kernel is not used


def test_finetuning_lowers_the_loss_and_keeps_every_weight_on_a_centroid(float_mlp, digits):
    train = digits[0]
    q = qjax.nn.quantize_model(float_mlp, finetune_rules(KM2))
    evaluate = nnx.jit(_xent)
    before = float(evaluate(q, train))
    books0 = jax.tree.map(np.array, kmeans_finetune.codebooks(q))
    step = qjax.training.make_train_step(_xent)
    optimizer = qjax.training.make_optimizer(q, optax.adam(1e-3))
    losses = [float(step(q, optimizer, train)) for _ in range(25)]
    after = float(evaluate(q, train))
    assert losses[0] == pytest.approx(before, rel=1e-5)
    assert after < 0.7 * before, (before, after)
    for path, (centroids, indices) in kmeans_finetune.codebooks(q).items():
        np.testing.assert_array_equal(indices, books0[path][1])  # assignments fixed
        assert np.max(np.abs(np.asarray(centroids) - books0[path][0])) > 1e-3  # centroids trained
        weight = np.asarray(codebook_weight(centroids, indices, KM2))
        c = np.asarray(centroids).reshape(-1)
        assert set(np.unique(weight)) <= set(c)  # every weight is one of the 4 centroids
        np.testing.assert_array_equal(weight, c[np.asarray(indices, np.int64)])


def test_convert_stores_indices_and_trained_codebook_and_serves_the_qat_model(float_mlp, digits):
    q = qjax.nn.quantize_model(float_mlp, finetune_rules(KM3_CH))
    step = qjax.training.make_train_step(_xent)
    optimizer = qjax.training.make_optimizer(q, optax.adam(1e-3))
    for _ in range(3):
        step(q, optimizer, digits[0])
    served = qjax.nn.convert(q)
    x = digits[1][0]
    np.testing.assert_allclose(
        nnx.jit(lambda m, x: m(x))(served, x), nnx.jit(lambda m, x: m(x))(q, x), rtol=1e-6, atol=1e-6
    )
    rows = {r["path"]: r for r in qjax.nn.summary(served)}
    storage = kmeans_finetune.storage(served)
    for path, (centroids, indices), _ in _with_ops(q):
        stored = getattr(served, path).kernel[...]
        assert isinstance(stored, qjax.QArray)
        np.testing.assert_array_equal(stored.codebook, centroids)
        np.testing.assert_array_equal(stored.values, indices)
        np.testing.assert_array_equal(qjax.dequantize(stored), codebook_weight(centroids, indices, KM3_CH))
        k, n = indices.shape
        nbytes = k * -(-n * 3 // 8) + 4 * n * 8  # 3-bit indices, ceil(3 n / 8) bytes a row; n codebooks
        assert rows[path]["weight_bytes"] == storage[path]["weight_bytes"] == stored.nbytes == nbytes
        assert rows[path]["compression_ratio"] == pytest.approx(32 * k * n / (8 * nbytes))
        assert getattr(served, path).dot_general.centroids is None  # no second copy after convert
    total = storage["total"]
    assert total["float32_bytes"] == 4 * (64 * 32 + 32 * 32 + 32 * 10)
    assert total["compression_ratio"] == pytest.approx(total["float32_bytes"] / total["weight_bytes"])


def test_embedding_codebook_finetuning(rng):
    embed = nnx.Embed(40, 16, rngs=nnx.Rngs(0))
    q = qjax.nn.quantize_model(embed, finetune_rules(KM3_CH))
    op = q.promote_dtype
    ids = jnp.asarray(rng.integers(0, 40, size=(4, 7)))
    c = jnp.asarray(rng.normal(size=(4, 7, 16)), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(ids) * c)))(q)
    table = codebook_weight(op.centroids[...], op.indices[...], KM3_CH)
    g_table = jax.grad(lambda t: jnp.sum(t[ids] * c))(table)
    ref = per_cluster_sums(g_table, op.indices[...], KM3_CH, 8)
    np.testing.assert_allclose(grads["promote_dtype"]["centroids"][...], ref, rtol=1e-5, atol=1e-5)
    served = qjax.nn.convert(q)
    np.testing.assert_array_equal(served(ids), q(ids))


def test_finetune_rules_and_errors():
    rules = kmeans_finetune.finetune_rules(
        [Rule(path="a", weights=KM2), {"path": "b", "weights": {"dtype": "int4"}}]
    )
    assert [str(r.weight_estimator) for r in rules] == ["kmeans_finetune", "ste"]
    with pytest.raises(ValueError, match=r"Rule 'l': weight_estimator='kmeans_finetune' .* dtype='int4'"):
        Rule(path="l", weights=QuantSpec(dtype="int4"), weight_estimator="kmeans_finetune")
    with pytest.raises(ValueError, match=r"but the rule has no weight spec"):
        Rule(path="l", weight_estimator="kmeans_finetune")
    with pytest.raises(ValueError, match=r"activation_estimator='kmeans_finetune' trains a weight codebook"):
        Rule(path="l", activations=QuantSpec(dtype="int8"), activation_estimator="kmeans_finetune")
    with pytest.raises(ValueError, match=r"estimator='kmeans_finetune' is not a function of x"):
        qjax.fake_quant(jnp.ones((4, 4)), KM2, "kmeans_finetune")
    with pytest.raises(
        ValueError, match=r"centroids have shape \(1, 1, 8\), but a kmeans2 codebook .* \(1, 1, 4\)"
    ):
        codebook_weight(jnp.zeros((1, 1, 8)), jnp.zeros((4, 4), jnp.uint8), KM2)
    with pytest.raises(ValueError, match=r"centroid_gradient needs a kmeans spec .* dtype='int4'"):
        kmeans_finetune.centroid_gradient(jnp.zeros((4, 4)), jnp.zeros((4, 4)), QuantSpec(dtype="int4"))
    with pytest.raises(ValueError, match=r"convert it first"):
        kmeans_finetune.storage(
            qjax.nn.quantize_model(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), finetune_rules(KM2))
        )
    with_acts = [
        Rule(path=".*", weights=KM2, activations=QuantSpec(dtype="int8"), weight_estimator="kmeans_finetune")
    ]
    q = qjax.nn.quantize_model(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), with_acts)
    assert q(jnp.ones((2, 4))).shape == (2, 4)  # qat with quantized activations is fine
    with pytest.raises(ValueError, match=r"layer '': kmeans2 weights are served weight-only"):
        qjax.nn.convert(q)
    bad = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    bad.kernel[...] = bad.kernel[...].at[1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match=r"layer '' \(k-means of the kernel\): kernel holds 1 NaN or Inf"):
        qjax.nn.quantize_model(bad, finetune_rules(KM2))


def test_checkpoint_restores_centroids_and_indices(tmp_path, float_mlp, rng):
    """A restart restores the trained centroids and the fixed indices (not a fresh k-means)."""
    q = qjax.nn.quantize_model(float_mlp, finetune_rules(KM2))
    for _, _, op in qjax.nn.quantized_ops(q):
        op.centroids[...] = op.centroids[...] + 0.01
    other = nnx.clone(float_mlp)  # other weights, so other clusters
    for layer in (other.fc1, other.fc2, other.head):
        layer.kernel[...] = jnp.asarray(rng.normal(size=layer.kernel.shape), jnp.float32)
    with qjax.training.TrainingCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, q)
        ckpt.wait_until_finished()
        fresh = qjax.nn.quantize_model(other, finetune_rules(KM2))
        before = kmeans_finetune.codebooks(fresh)
        ckpt.restore(fresh)
    saved, restored = kmeans_finetune.codebooks(q), kmeans_finetune.codebooks(fresh)
    assert all(np.any(before[p][1] != saved[p][1]) for p in saved)
    assert saved.keys() == restored.keys() == {"fc1", "fc2", "head"}
    for path, (centroids, indices) in saved.items():
        np.testing.assert_array_equal(restored[path][0], centroids)
        np.testing.assert_array_equal(restored[path][1], indices)
        assert restored[path][1].dtype == jnp.uint8
