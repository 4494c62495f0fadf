"""qjax experiments: the programs built on the library.

* :mod:`experiments.sweep`: the config-driven sweep runner behind ``qjax-run`` and ``qjax-report``.
* :mod:`experiments.tasks`: datasets and the small models the sweeps train, looked up by name.
* :mod:`experiments.kernels`: the kernel lab (benchmark, speed goals, device check, tuning, profile).
* :mod:`experiments.scripts`: one-off demos and the tables of the committed studies.
* :mod:`experiments.records`: atomic results files and the protocol every result records (shared).
"""
