#!/usr/bin/env bash
# The kernel tests under jax 0.11.2, the version of the GPU machines the kernels are timed on (jax
# 0.11 needs Python >= 3.12; the main suite runs jax 0.10.2 on Python 3.11), and the quantized
# training step that scripts/device_training.sh times (its CPU smoke run and its cuda lowering). Makes .venv-jax011
# from the first Python 3.12 found (on PATH or under pyenv); says so and exits 0 if there is none.
# --setup-only: make the environment and stop. JAX011_WORKERS: pytest workers (default 2; CI runs
# one beside the main suite).
# Not repeated here (they run in the main suite under jax 0.10.2): serving tests of qjax.nn (on CPU
# they run XLA's integer path, not Pallas), the routing of served layers to the kernels
# (tests/kernels/test_dispatch.py: which kernel a layer takes, weights prepared once, imports; the
# kernels it routes to are tested here one by one), and the benchmark's bookkeeping
# (tests/experiments/kernels/bench: rows, accounting, the CPU smoke run of its command line).
set -euo pipefail
cd "$(dirname "$0")/.."
py=""
for cand in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
  if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    py="$cand"
    break
  fi
done
if [ -z "$py" ]; then
  echo "note: no Python 3.12 here; the kernel tests under jax 0.11.2 did not run" >&2
  exit 0
fi
stamp=".venv-jax011/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x .venv-jax011/bin/python ] || "$py" -m venv .venv-jax011
  .venv-jax011/bin/python -m pip install -q --upgrade pip
  .venv-jax011/bin/python -m pip install -q "jax==0.11.2" "jaxlib==0.11.2" -e ".[test]"
  touch "$stamp"
fi
.venv-jax011/bin/python -c "import jax; assert jax.__version__ == '0.11.2', jax.__version__"
if [ "${1:-}" = "--setup-only" ]; then
  exit 0
fi
k=tests/experiments/kernels
.venv-jax011/bin/python -m pytest -q -n "${JAX011_WORKERS:-2}" -p no:cacheprovider tests/kernels --ignore=tests/kernels/test_dispatch.py \
  $k/test_timing.py $k/test_profile_w4a16.py $k/test_check.py \
  tests/experiments/scripts/test_bench_train_step_device.py "$@"
