"""The qjax test suite; its folders mirror the package tree (``qjax/`` and ``experiments/``)."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository root
