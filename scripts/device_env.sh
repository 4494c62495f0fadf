# Sourced by the device scripts (scripts/device_*.sh) after they set `out_default`: the results
# folder `out` ($OUT, the device tool's folder, else out_default), `py` ($PYTHON, else python3),
# PYTHONPATH with the repository root, and device.txt (the GPU, the driver, jax and its devices).
set -uo pipefail
out="${OUT:-$out_default}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
} | tee "$out/device.txt"
