"""Example plug-ins: code a user writes outside qjax, registered by name (``docs/plugins.md``).

* :mod:`examples.noise_estimator`: the ``noise`` estimator (noise-injection QAT).
* :mod:`examples.dorefa`: the ``dorefa`` estimator (DoReFa-Net's tanh-normalised weights).
* :mod:`examples.blobs_task`: the ``blobs`` task (Gaussian blobs) and its ``mlp`` model.

A sweep config loads them with ``plugins: [examples.noise_estimator, ...]`` (``noise_qat.yaml``,
``blobs.yaml`` here), run from the repository root.
"""
