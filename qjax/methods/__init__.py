"""Post-training and training-time quantization methods built on :mod:`qjax.nn`.

* AdaRound (Nagel et al. 2020): :func:`adaround` (model integration, :mod:`qjax.methods.adaround`)
  over the math in :mod:`qjax.methods.adaround_core`.
"""

from qjax.methods.adaround import LayerReport, adaround
from qjax.methods.adaround_core import AdaRoundConfig

__all__ = ["AdaRoundConfig", "LayerReport", "adaround"]
