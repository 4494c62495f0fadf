"""The experiment tasks: IDX parsing and Fashion-MNIST checks, the tiny-LM data and metrics, models
that train, ``get_task`` lookups and errors."""

import gzip
import hashlib
import math
import struct
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.sweep.schema import TaskConfig
from experiments.tasks import (
    batchnorm_pairs,
    classification_finish,
    classification_metrics,
    evaluate,
    get_task,
    require_inference_mode,
    tiny_lm,
)
from experiments.tasks import fashion_mnist as fm
from qjax.nn import fold_batchnorm
from qjax.training import make_optimizer, make_train_step

FASHION_DIR = Path(fm.DEFAULT_DIR)
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist is not installed",
)
# MD5 of the decompressed files of the official release (published with it; independent of SHA256).
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


def idx_bytes(type_code: int, fmt: str, array: np.ndarray) -> bytes:
    """IDX bytes written with ``struct`` (an independent writer): magic, big-endian sizes, data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + struct.pack(f">{array.size}{fmt}", *array.ravel().tolist())


def write_fake_fashion(directory: Path, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        (directory / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(0x08, "B", a)))
    return arrays


# -- IDX and Fashion-MNIST files ------------------------------------------------------------------


def test_parse_idx_matches_struct_written_data():
    a = np.random.default_rng(1).integers(0, 256, (4, 3, 2), dtype=np.uint8)
    out = fm.parse_idx(idx_bytes(0x08, "B", a), ndim=3)
    assert out.dtype == np.uint8 and out.shape == (4, 3, 2)
    np.testing.assert_array_equal(out, a)
    s = np.array([[-300, 2], [7, 32767]], np.int16)  # big-endian multi-byte elements
    out16 = fm.parse_idx(idx_bytes(0x0B, "h", s))
    assert out16.dtype == np.int16 and out16.dtype.isnative
    np.testing.assert_array_equal(out16, s)


def test_parse_idx_errors():
    good = idx_bytes(0x08, "B", np.zeros((2, 3), np.uint8))
    with pytest.raises(fm.DatasetError, match=r"labels: bad IDX magic number 01000802"):
        fm.parse_idx(b"\x01" + good[1:], name="labels")
    with pytest.raises(fm.DatasetError, match=r"bad IDX magic number 00000702"):
        fm.parse_idx(good[:2] + b"\x07" + good[3:])
    with pytest.raises(fm.DatasetError, match=r"header says 2 dimensions; expected 1"):
        fm.parse_idx(good, ndim=1)
    with pytest.raises(fm.DatasetError, match=r"17 bytes, but the header's shape \(2, 3\) of uint8 needs 18"):
        fm.parse_idx(good[:-1])


def test_synthetic_files_parse_and_fail_the_checksum(tmp_path):
    arrays = write_fake_fashion(tmp_path)
    with pytest.raises(
        fm.DatasetError, match=r"train-images-idx3-ubyte: SHA-256 of the decompressed data is"
    ):
        fm.load_fashion_mnist(tmp_path)
    (xtr, ytr, xte, yte), checksum = fm.load_fashion_mnist(tmp_path, verify=False)
    assert xtr.shape == (5, 28, 28, 1) and xte.shape == (3, 28, 28, 1)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int32
    np.testing.assert_array_equal(xtr[..., 0], (arrays["train-images-idx3-ubyte"] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(yte, arrays["t10k-labels-idx1-ubyte"])
    raw = b"".join(idx_bytes(0x08, "B", arrays[s]) for s in fm.FILES)
    assert checksum == hashlib.sha256(raw).hexdigest()


def test_labels_out_of_range_are_rejected(tmp_path):
    write_fake_fashion(tmp_path)
    bad = np.array([3, 10, 1], np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(0x08, "B", bad)))
    with pytest.raises(fm.DatasetError, match=r"t10k: label 10 is not a class index in 0\.\.9"):
        fm.load_fashion_mnist(tmp_path, verify=False)


def test_uncompressed_files_are_read_too(tmp_path):
    arrays = write_fake_fashion(tmp_path)
    stem = "t10k-labels-idx1-ubyte"
    (tmp_path / f"{stem}.gz").unlink()
    (tmp_path / stem).write_bytes(idx_bytes(0x08, "B", arrays[stem]))
    (_, _, _, yte), _ = fm.load_fashion_mnist(tmp_path, verify=False)
    np.testing.assert_array_equal(yte, arrays[stem])


def test_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(
        fm.DatasetError, match=r"does not exist; install it with `sudo apt-get install dataset-"
    ):
        fm.load_fashion_mnist(tmp_path / "nowhere")
    write_fake_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(
        fm.DatasetError, match=r"t10k-images-idx3-ubyte\(\.gz\) not found in .*task\.data_dir"
    ):
        fm.load_fashion_mnist(tmp_path, verify=False)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(fm.DatasetError, match=r"not a valid gzip file"):
        fm.load_fashion_mnist(tmp_path, verify=False)
    with pytest.raises(ValueError, match=r"nowhere does not exist; install it with"):
        get_task(TaskConfig(name="fashion_mnist", model="cnn", data_dir=str(tmp_path / "nowhere")))


@needs_fashion
def test_installed_files_are_the_official_release():
    for stem, md5 in OFFICIAL_MD5.items():
        data = gzip.decompress((FASHION_DIR / f"{stem}.gz").read_bytes())
        assert hashlib.md5(data).hexdigest() == md5, stem


@needs_fashion
def test_fashion_mnist_task():
    task = get_task(TaskConfig(name="fashion_mnist", model="cnn"))
    assert task.train.x.shape == (60000, 28, 28, 1) and task.test.x.shape == (10000, 28, 28, 1)
    assert task.train.x.dtype == np.float32 and task.train.y.dtype == np.int32
    assert task.train.x.min() == 0.0 and task.train.x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(task.train.y), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(task.test.y), np.full(10, 1000))
    assert get_task(TaskConfig(name="fashion_mnist", model="mlp")).train.x is task.train.x  # cached
    small = get_task(TaskConfig(name="fashion_mnist", model="cnn", train_limit=100))
    assert len(small.train) == 100 and len(small.test) == 10000 and "first 100" in small.description


# -- models and metrics ---------------------------------------------------------------------------


def loss_drops(task, model_name, model_args, *, steps, batch_size, lr):
    """Loss on a fixed batch before and after ``steps`` Adam steps on that batch."""
    model = task.make_model(model_name, model_args, 0)
    batch = task.train.take(np.arange(batch_size))
    model.train()
    step = make_train_step(task.loss)
    opt = make_optimizer(model, optax.adam(lr))
    losses = [float(step(model, opt, batch)) for _ in range(steps)]
    return losses[0], losses[-1]


@pytest.mark.parametrize(
    "task_name, model_name, model_args",
    [
        ("digits", "mlp", {}),
        ("digits", "cnn", {}),
        pytest.param("fashion_mnist", "cnn", {}, marks=needs_fashion),
        pytest.param("fashion_mnist", "mlp", {}, marks=needs_fashion),
        ("tiny_lm", "transformer", {"d": 32, "layers": 1, "heads": 2}),
    ],
)
def test_a_few_steps_reduce_the_loss(task_name, model_name, model_args):
    task = get_task(TaskConfig(name=task_name, model=model_name))
    first, last = loss_drops(task, model_name, model_args, steps=8, batch_size=32, lr=3e-3)
    assert np.isfinite(first) and last < first - 0.5, (first, last)  # nats


@needs_fashion
def test_cnn_batchnorm_modes_and_folding():
    task = get_task(TaskConfig(name="fashion_mnist", model="cnn"))
    model = task.make_model("cnn", {}, 0)
    x, y = task.train.take(np.arange(64))
    model.train()
    step, opt = make_train_step(task.loss), make_optimizer(model, optax.adam(1e-3))
    for _ in range(3):
        step(model, opt, (x, y))
    assert not np.allclose(model.bn1.mean[...], 0.0)  # running statistics moved
    with pytest.raises(ValueError, match=r"module 'bn1' \(BatchNorm\) is in training mode; call model\.eval"):
        nnx.jit(task.metrics)(model, (x, y))
    model.eval()
    folded = fold_batchnorm(model, fm.batchnorm_pairs("cnn"))
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert fm.batchnorm_pairs("mlp") == []
    assert batchnorm_pairs("fashion_mnist", "cnn") == [("conv1", "bn1"), ("conv2", "bn2")]
    assert batchnorm_pairs("digits", "cnn") == batchnorm_pairs("tiny_lm", "transformer") == []
    with pytest.raises(ValueError, match=r"model_name='resnet' is not a Fashion-MNIST model"):
        fm.batchnorm_pairs("resnet")


class FixedLogits(nnx.Module):
    def __init__(self, logits: np.ndarray):
        self.logits = nnx.Param(jnp.asarray(logits))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.logits[...][x[:, 0]]


def test_classification_metrics_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    y = np.array([0, 3, 3, 9, 1, 2], np.int32)
    logits[1, 3] = 9.0  # example 1 certainly correct
    sums = classification_metrics(FixedLogits(logits), (jnp.arange(6)[:, None], jnp.asarray(y)))
    z = logits.astype(np.float64)
    nll = np.log(np.exp(z).sum(-1)) - z[np.arange(6), y]
    assert float(sums["count"]) == 6 and float(sums["correct"]) == np.sum(z.argmax(-1) == y)
    np.testing.assert_allclose(float(sums["loss_sum"]), nll.sum(), rtol=1e-6)
    out = classification_finish({k: float(v) for k, v in sums.items()})
    np.testing.assert_allclose(out["loss"], nll.mean(), rtol=1e-6)


def test_evaluate_does_not_depend_on_batch_size():
    task = get_task(TaskConfig(name="digits", model="mlp"))
    model = task.make_model("mlp", {}, 3)
    whole, batched = evaluate(task, model, len(task.test)), evaluate(task, model, 100)  # 449 = 4 x 100 + 49
    assert whole["accuracy"] == batched["accuracy"]
    np.testing.assert_allclose(whole["loss"], batched["loss"], rtol=1e-5)


# -- tiny LM --------------------------------------------------------------------------------------


def test_lm_windows_are_slices_of_the_text():
    task = get_task(TaskConfig(name="tiny_lm", model="transformer"))
    text = tiny_lm.load_text()
    cut = len(text) - len(text) // 10
    train, val = text[:cut], text[cut:]
    assert task.checksum == hashlib.sha256(text).hexdigest()
    assert task.train.x.shape[1] == tiny_lm.CONTEXT and task.train.x.dtype == np.int32
    np.testing.assert_array_equal(task.train.y[:, :-1], task.train.x[:, 1:])
    offsets = tiny_lm.train_offsets(len(train))
    for i in (0, 17, len(offsets) - 1):
        o = int(offsets[i])
        assert bytes(task.train.x[i].astype(np.uint8)) == train[o : o + tiny_lm.CONTEXT]
        assert bytes(task.train.y[i].astype(np.uint8)) == train[o + 1 : o + tiny_lm.CONTEXT + 1]
    covered = np.zeros(len(train), bool)
    covered[offsets[:, None] + np.arange(tiny_lm.CONTEXT + 1)] = True
    assert covered[tiny_lm.TRAIN_STRIDE : -2 * tiny_lm.TRAIN_STRIDE].all()
    # validation: consecutive non-overlapping windows from the start of the last 10%
    assert bytes(task.test.x.ravel().astype(np.uint8)) == val[: task.test.x.size]
    assert len(task.test) == (len(val) - 1) // tiny_lm.CONTEXT


def test_lm_perplexity_of_uniform_and_untrained_models():
    task = get_task(TaskConfig(name="tiny_lm", model="transformer"))
    model = task.make_model("transformer", {"d": 32, "layers": 1, "heads": 2}, 0)
    model.eval()
    untrained = evaluate(task, model, 128)
    assert 230 < untrained["perplexity"] < 290, untrained
    model.head.kernel.set_value(jnp.zeros_like(model.head.kernel[...]))
    model.head.bias.set_value(jnp.zeros_like(model.head.bias[...]))
    uniform = evaluate(task, model, 128)
    np.testing.assert_allclose(uniform["perplexity"], 256.0, rtol=1e-6)
    np.testing.assert_allclose(uniform["loss"], math.log(256), rtol=1e-6)
    with pytest.raises(ValueError, match=r"sequence length 129 exceeds the model's context=128"):
        model(jnp.zeros((1, 129), jnp.int32))


# -- get_task -------------------------------------------------------------------------------------


def test_get_task_errors():
    with pytest.raises(
        ValueError,
        match=r"task\.name='fashion_mnst' is not a task; did you mean 'fashion_mnist'\? "
        r"use one of \['digits', 'fashion_mnist', 'llm', 'tiny_lm'\]",
    ):
        get_task(TaskConfig(name="fashion_mnst", model="cnn"))
    with pytest.raises(ValueError, match=r"task\.name='imagenet' is not a task; use one of"):
        get_task(TaskConfig(name="imagenet", model="cnn"))
    with pytest.raises(ValueError, match=r"data_args=\{'window': 64\}: only task 'llm' takes data options"):
        get_task(TaskConfig(name="digits", model="mlp", data_args={"window": 64}))
    with pytest.raises(
        ValueError, match=r"task\.model='cnnn' is not a model of task 'digits'; did you mean 'cnn'\?"
    ):
        get_task(TaskConfig(name="digits", model="cnnn"))
    with pytest.raises(ValueError, match=r"task\.train_limit=-1 must be >= 0"):
        get_task(TaskConfig(name="digits", model="cnn", train_limit=-1))


def test_require_inference_mode_accepts_eval_models():
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"module 'layers/1' \(Dropout\) is in training mode"):
        require_inference_mode(model)
    model.eval()
    require_inference_mode(model)
