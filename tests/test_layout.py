"""The layout rules of the repository (``docs/ARCHITECTURE.md``): ``experiments/`` keeps its
programs in folders, and ``tests/`` mirrors the package tree with every folder a package."""

from tests import ROOT

TESTS = ROOT / "tests"


def test_experiments_keeps_its_programs_in_folders():
    top = sorted(p.name for p in (ROOT / "experiments").glob("*.py"))
    assert len(top) <= 3, f"experiments/ has {top} at its top level; put a program in its folder"


def test_every_test_folder_is_a_package():
    """Without ``__init__.py`` a folder's test modules import as top-level packages (``kernels``,
    ``scripts``, ``sweep``) that can shadow real ones."""
    folders = [d for d in TESTS.rglob("*") if d.is_dir() and d.name != "__pycache__"]
    missing = [str(d.relative_to(ROOT)) for d in [TESTS, *folders] if not (d / "__init__.py").is_file()]
    assert not missing, f"add an empty __init__.py to {missing}"


def test_test_folders_mirror_the_tree():
    """``tests/<path>/`` tests ``qjax/<path>/``, ``experiments/<path>/`` (``tests/experiments/...``),
    ``examples/`` (``tests/examples``) or ``scripts/`` (``tests/scripts``); ``tests/faults/`` is the
    fault-injection suite, which crosses the layers."""
    strays = []
    for d in TESTS.rglob("*"):
        if not d.is_dir() or d.name == "__pycache__":
            continue
        rel = d.relative_to(TESTS)
        if rel.parts[0] == "faults":
            continue
        under = ROOT / rel if rel.parts[0] in ("experiments", "examples", "scripts") else ROOT / "qjax" / rel
        if not under.is_dir():
            strays.append(str(rel))
    assert not strays, f"tests/{strays} mirror no folder of qjax/, experiments/ or scripts/"


def test_modules_beside_the_tests_are_tests_or_the_known_helpers():
    files = [p for p in TESTS.rglob("*.py") if p.name not in ("__init__.py", "conftest.py")]
    helpers = {p.relative_to(TESTS).as_posix() for p in files if not p.name.startswith("test_")}
    assert helpers <= {"nn/serving.py", "processes.py"}, f"modules that are not tests: {sorted(helpers)}"
