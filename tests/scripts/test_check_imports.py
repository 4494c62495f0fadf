"""``scripts/check_imports.py``: the import rules (no private names across modules, layers, the
experimental kernels reached by name only) on small synthetic trees; ``scripts/test.sh`` runs it on
the repository."""

import importlib.util
import pathlib
import textwrap

import pytest

from tests import ROOT

spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
assert spec is not None and spec.loader is not None
check_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_imports)

PACKAGES = (
    "qjax",
    "qjax/numerics",
    "qjax/nn",
    "qjax/kernels",
    "qjax/kernels/experimental",
    "experiments",
    "experiments/kernels",
    "tests",
)


def tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def problems(tmp_path: pathlib.Path, files: dict[str, str]) -> list[str]:
    return check_imports.check(tree(tmp_path, files))


def test_a_clean_tree_passes(tmp_path):
    files = {
        "qjax/numerics/spec.py": "def parse(x):\n    return _helper(x)\n\ndef _helper(x):\n    return x\n",
        "qjax/nn/rules.py": "from qjax.numerics import spec\nfrom qjax.numerics.spec import parse\n",
        "qjax/kernels/w8a8.py": "def run():\n    from qjax.kernels.experimental import hopper\n",
        "qjax/kernels/experimental/hopper.py": "from qjax.kernels import w8a8\n",
        "experiments/kernels/bench.py": "from qjax.kernels.experimental import hopper\n",
    }
    assert problems(tmp_path, files) == []


@pytest.mark.parametrize(
    "source, found",
    [
        (
            "from qjax.numerics.spec import _helper\n",
            "imports the private name _helper of qjax.numerics.spec",
        ),
        (
            "from qjax.numerics import spec\nspec._helper(1)\n",
            "uses the private name _helper of qjax.numerics.spec",
        ),
        (
            "import qjax.numerics.spec as s\ns._helper(1)\n",
            "uses the private name _helper of qjax.numerics.spec",
        ),
    ],
    ids=["from-import", "module-attribute", "aliased-module"],
)
def test_private_names_across_modules_are_refused(tmp_path, source, found):
    files = {"qjax/numerics/spec.py": "def _helper(x):\n    return x\n", "qjax/nn/rules.py": source}
    (line,) = problems(tmp_path, files)
    assert line.startswith("qjax/nn/rules.py:") and found in line


def test_private_names_inside_their_module_and_dunders_are_fine(tmp_path):
    me = "import qjax.numerics.spec as me\n\ndef _h():\n    return me._h, me.__name__\n"
    files = {"qjax/numerics/spec.py": me}
    assert problems(tmp_path, files) == []


@pytest.mark.parametrize(
    "name, source",
    [
        ("qjax/numerics/spec.py", "from qjax.nn import rules\n"),
        ("qjax/kernels/w8a8.py", "import qjax.nn.rules\n"),
        ("qjax/nn/rules.py", "from experiments.kernels import bench\n"),
        ("experiments/kernels/bench.py", "from experiments.sweep import runner\n"),
        ("qjax/nn/rules.py", "import qjax\n"),
    ],
    ids=["numerics->nn", "kernels->nn", "qjax->experiments", "kernel-lab->sweep", "nn->qjax-top"],
)
def test_imports_of_a_higher_layer_are_refused(tmp_path, name, source):
    (line,) = problems(tmp_path, {name: source})
    assert line.startswith(f"{name}:1:") and "it may import" in line


def test_experimental_kernels_only_by_name(tmp_path):
    files = {"qjax/kernels/dispatch.py": "from qjax.kernels.experimental import hopper\n"}
    (line,) = problems(tmp_path, files)
    assert "imports qjax.kernels.experimental at module level" in line


def test_a_module_outside_every_layer_is_named(tmp_path):
    (line,) = problems(tmp_path, {"qjax/stray.py": "x = 1\n"})
    assert "qjax.stray is in no layer" in line
