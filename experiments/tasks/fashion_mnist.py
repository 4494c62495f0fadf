"""Fashion-MNIST (Zalando, 2017): 70,000 28x28 grayscale images of 10 clothing classes.

Data: the four IDX files of the official release, read from ``task.data_dir`` or from
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``), gzipped
(``train-images-idx3-ubyte.gz``) or not (``train-images-idx3-ubyte``). Nothing is downloaded.

IDX format (big-endian): bytes 0-1 are zero, byte 2 the element type (``0x08`` = uint8), byte 3 the
number of dimensions :math:`k`, then :math:`k` uint32 sizes, then the elements in C order. Images are
``(N, 28, 28)`` uint8, labels ``(N,)`` uint8 in 0..9.

Checksums are SHA-256 of the *decompressed* IDX bytes: the Debian package recompressed the official
``.gz`` files (new gzip header), so their compressed hashes differ from the release's while the data
is byte-identical (the MD5s of the decompressed files, ``f4a8712d...``, ``9018921c...``,
``8181f547...``, ``15d48437...``, are the published ones of the official files).

Tensors: images float32 :math:`x = p / 255 \\in [0, 1]` of shape (N, 28, 28, 1), labels int32.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import flax.nnx as nnx
import jax
import numpy as np

from experiments.tasks import ImageMLP, classification_task
from experiments.tasks.base import Task

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (files go to "
    f"{DEFAULT_DIR}) or set task.data_dir to a directory holding the four IDX files"
)
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# SHA-256 of the decompressed official files (checked against the published MD5s, see module doc).
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX element type code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(ValueError):
    """A dataset file is missing, malformed or not the expected one."""


def parse_idx(data: bytes, *, name: str = "IDX data", ndim: int | None = None) -> np.ndarray:
    """The array stored in IDX bytes (see the module docstring), in native byte order.

    Raises :class:`DatasetError` naming ``name`` for a bad magic number, an unexpected number of
    dimensions, or a payload whose length does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        codes = ", ".join(f"{c:02x}" for c in _IDX_DTYPES)
        raise DatasetError(
            f"{name}: bad IDX magic number {data[:4].hex() or '(empty)'}; expected 0000, a type code "
            f"({codes}) and the rank, e.g. 00000803 for uint8 images"
        )
    dtype, k = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if ndim is not None and k != ndim:
        raise DatasetError(f"{name}: IDX header says {k} dimensions; expected {ndim}")
    header = 4 + 4 * k
    if len(data) < header:
        raise DatasetError(f"{name}: truncated IDX header ({len(data)} bytes, {k} dimensions)")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=k, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(
            f"{name}: {len(data)} bytes, but the header's shape {shape} of {dtype.name} needs {expected}"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _read(directory: Path, stem: str) -> bytes:
    for path in (directory / f"{stem}.gz", directory / stem):
        if path.is_file():
            if path.suffix != ".gz":
                return path.read_bytes()
            try:
                return gzip.decompress(path.read_bytes())
            except (OSError, EOFError) as e:
                raise DatasetError(f"{path}: not a valid gzip file ({e}); {INSTALL_HINT}") from e
    raise DatasetError(f"Fashion-MNIST file {stem}(.gz) not found in {directory}; {INSTALL_HINT}")


def read_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None, *, verify: bool = True
) -> tuple[tuple[np.ndarray, ...], str]:
    """``((train_images, train_labels, test_images, test_labels), checksum)`` as raw uint8 arrays.

    ``checksum`` is the SHA-256 of the four decompressed files concatenated in the order of
    :data:`FILES`. With ``verify``, each file's SHA-256 must equal :data:`SHA256`.
    """
    directory = Path(data_dir if data_dir is not None else DEFAULT_DIR).expanduser()
    if not directory.is_dir():
        raise DatasetError(f"Fashion-MNIST directory {directory} does not exist; {INSTALL_HINT}")
    total = hashlib.sha256()
    arrays = []
    for stem in FILES:
        data = _read(directory, stem)
        digest = hashlib.sha256(data).hexdigest()
        if verify and digest != SHA256[stem]:
            raise DatasetError(
                f"{directory / stem}: SHA-256 of the decompressed data is {digest}, expected "
                f"{SHA256[stem]} (the official Fashion-MNIST file); the file is corrupt or another "
                f"dataset. Reinstall with `sudo apt-get install --reinstall dataset-fashion-mnist` "
                f"or point task.data_dir at the official files"
            )
        total.update(data)
        arrays.append(parse_idx(data, name=str(directory / stem), ndim=3 if "images" in stem else 1))
    for images, labels, split in ((arrays[0], arrays[1], "train"), (arrays[2], arrays[3], "t10k")):
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DatasetError(
                f"{split}: images {images.shape} and labels {labels.shape} do not form (N, 28, 28) / (N,)"
            )
        if labels.size and labels.max() >= len(CLASSES):
            raise DatasetError(f"{split}: label {labels.max()} is not a class index in 0..{len(CLASSES) - 1}")
    return tuple(arrays), total.hexdigest()


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None, *, verify: bool = True
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], str]:
    """``((x_train, y_train, x_test, y_test), checksum)``: float32 (N, 28, 28, 1) in [0, 1], int32."""
    (xtr, ytr, xte, yte), checksum = read_fashion_mnist(data_dir, verify=verify)
    images = [(x.astype(np.float32) / np.float32(255.0))[..., None] for x in (xtr, xte)]
    return (images[0], ytr.astype(np.int32), images[1], yte.astype(np.int32)), checksum


# -- models ---------------------------------------------------------------------------------------


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, of (B, H, W, C) with even H, W, as a reshape and a max: on CPU its
    gradient is about twice as fast as ``nnx.max_pool``'s (``reduce_window`` / ``select_and_scatter``)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class CNN(nnx.Module):
    """conv3x3(c1) -> BN -> relu -> maxpool2 -> conv3x3(c2) -> BN -> relu -> maxpool2 -> linear 10.

    The convolutions have no bias (the batch norm's offset plays its role; folding creates one).
    ``(conv1, bn1)`` and ``(conv2, bn2)`` are the pairs of :func:`batchnorm_pairs`. Use
    ``model.train()`` (batch statistics, running averages updated) and ``model.eval()``.
    """

    def __init__(self, channels: Sequence[int] = (16, 32), *, rngs: nnx.Rngs):
        c1, c2 = (int(c) for c in channels)
        self.conv1 = nnx.Conv(1, c1, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c1, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c2, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(7 * 7 * c2, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (B, 28, 28, 1)
        x = max_pool2(jax.nn.relu(self.bn1(self.conv1(x))))  # (B, 14, 14, c1)
        x = max_pool2(jax.nn.relu(self.bn2(self.conv2(x))))  # (B, 7, 7, c2)
        return self.head(x.reshape(x.shape[0], -1))


class MLP(ImageMLP):
    """784 -> hidden -> hidden -> 10 with ReLU."""

    def __init__(self, hidden: int = 256, *, rngs: nnx.Rngs):
        super().__init__(784, hidden, rngs=rngs)


MODELS = {"cnn": CNN, "mlp": MLP}


def make_task(data_dir: str | None = None) -> Task:
    """The Fashion-MNIST :class:`Task` (60,000 train / 10,000 test images, models ``cnn``, ``mlp``)."""
    arrays, checksum = load_fashion_mnist(data_dir)
    description = (
        f"Fashion-MNIST from {data_dir or DEFAULT_DIR}: {len(arrays[1])} train / {len(arrays[3])} test "
        "images 28x28x1 in [0, 1], 10 classes; checksum = SHA-256 of the four decompressed IDX files"
    )
    return classification_task("fashion_mnist", arrays, MODELS, checksum, description)


def batchnorm_pairs(model_name: str) -> list[tuple[str, str]]:
    """The ``(layer_path, batchnorm_path)`` pairs of ``model_name`` for :func:`qjax.nn.fold_batchnorm`
    (each BatchNorm directly consumes its layer's output)."""
    if model_name not in MODELS:
        raise ValueError(
            f"model_name={model_name!r} is not a Fashion-MNIST model; use one of {sorted(MODELS)}"
        )
    return [("conv1", "bn1"), ("conv2", "bn2")] if model_name == "cnn" else []
