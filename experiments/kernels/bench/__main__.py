"""``python -m experiments.kernels.bench``: see :mod:`experiments.kernels.bench`."""

import sys

from experiments.kernels.bench.cli import main

sys.exit(main())
