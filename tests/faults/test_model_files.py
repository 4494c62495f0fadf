"""Damaged model files: GGUF and safetensors files with garbage in their tensor data, or cut
short. Loading names the file and the tensor (non-finite values after dequantization, fewer values
than the header says) instead of loading a model that computes NaN."""

import pytest

from qjax.models import load_gguf, load_hf, save_hf
from qjax.models.llama import TINY
from tests.models.test_llama import GGUF_CONFIG, random_model, write_gguf


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", random_model(GGUF_CONFIG), GGUF_CONFIG)


def damaged_copy(src, dst, *, at=None, cut=None, n=4096):
    data = bytearray(src.read_bytes())
    if at is not None:
        start = len(data) - at
        data[start : start + n] = b"\xff" * n  # float32 0xFFFFFFFF is NaN
    if cut is not None:
        data = data[: len(data) - cut]
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("at", [4096 * 2, 4096 * 40])
def test_gguf_garbage_in_tensor_data_names_the_tensor(gguf_file, tmp_path, at):
    bad = damaged_copy(gguf_file, tmp_path / "bad.gguf", at=at)
    with pytest.raises(
        ValueError, match=rf"{bad}: tensor '.+' holds \d+ non-finite values .* the file is damaged"
    ):
        load_gguf(bad)


@pytest.mark.parametrize("cut", [100, 4096 * 10, 10**9])
def test_truncated_gguf_says_truncated(gguf_file, tmp_path, cut):
    size = gguf_file.stat().st_size
    bad = damaged_copy(gguf_file, tmp_path / "cut.gguf", cut=min(cut, size - 16))
    with pytest.raises(ValueError, match=rf"{bad}: .*truncated or damaged"):
        load_gguf(bad)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf(random_model(), TINY, tmp_path_factory.mktemp("hf") / "hf")


def test_safetensors_garbage_names_the_tensor(hf_dir, tmp_path):
    import shutil

    bad = shutil.copytree(hf_dir, tmp_path / "bad")
    [weights] = bad.glob("*.safetensors")
    damaged_copy(weights, weights, at=4096 * 3)
    with pytest.raises(ValueError, match=rf"{bad}: tensor '.+' holds \d+ non-finite values"):
        load_hf(bad)


@pytest.mark.parametrize("cut", [100, 10**9])
def test_truncated_safetensors_says_truncated(hf_dir, tmp_path, cut):
    import shutil

    bad = shutil.copytree(hf_dir, tmp_path / "cut")
    [weights] = bad.glob("*.safetensors")
    damaged_copy(weights, weights, cut=min(cut, weights.stat().st_size - 4))
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file .*truncated or"):
        load_hf(bad)
