"""The sweep runner: YAML config -> validated grid of cells -> runs -> ``results.jsonl`` -> report.

``qjax-run`` is :mod:`experiments.sweep.run`, ``qjax-report`` is :mod:`experiments.sweep.report`.
A config is parsed and validated once (:mod:`~experiments.sweep.config`,
:mod:`~experiments.sweep.validation`, fields in :mod:`~experiments.sweep.schema`); each cell is run
by :mod:`~experiments.sweep.runner` (float training in :mod:`~experiments.sweep.train_loop`, the LLM
methods in :mod:`~experiments.sweep.llm_methods`, storage and energy in
:mod:`~experiments.sweep.energy`, training metrics in :mod:`~experiments.sweep.tracking`); the
report's training curves are :mod:`~experiments.sweep.curves`'s.
"""
