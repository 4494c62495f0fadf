"""The kernel lab: measures the Pallas kernels of :mod:`qjax.kernels` on a device.

``python -m experiments.kernels.bench`` (the benchmark against XLA's bf16 matmul),
``.goals`` (the speed goals judged on benchmark results), ``.check`` (every kernel against its
reference on the device), ``.tune`` (block sizes), ``.profile_w4a16`` (parts of the W4A16 kernel);
:mod:`~experiments.kernels.timing` is the device clock they share. ``scripts/device_kernels.sh``
runs them all on a lent GPU.
"""
