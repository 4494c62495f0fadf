"""One-off programs: the numerics demo, CPU benchmarks of the numerics and of a QAT step, and the
tables of the committed studies (rounding, LLM methods, LLM outliers, the LLM reference check).
Each runs as ``python -m experiments.scripts.<name>``."""
