"""Post-training and training-time quantization methods built on :mod:`qjax.nn`.

* AdaRound (Nagel et al. 2020): :func:`adaround` (model integration, :mod:`qjax.methods.adaround`)
  over the math in :mod:`qjax.methods.adaround_core`.
* Mixed precision by sensitivity: :mod:`qjax.methods.mixed_precision`.
* k-means centroid fine-tuning (Deep Compression): :mod:`qjax.methods.kmeans_finetune`.
* SmoothQuant (Xiao et al. 2023): :func:`smoothing_factors`, :func:`smooth`, :func:`smoothquant_rules`
  (:mod:`qjax.methods.smoothquant`).
* LLM.int8() (Dettmers et al. 2022): :func:`llm_int8_matmul`, :func:`apply_llm_int8`
  (:mod:`qjax.methods.llm_int8`).
"""

from qjax.methods.adaround import LayerReport, adaround
from qjax.methods.adaround_core import AdaRoundConfig
from qjax.methods.llm_int8 import (
    LLMInt8DotGeneral,
    apply_llm_int8,
    llm_int8_matmul,
    outlier_mask,
    outlier_stats,
)
from qjax.methods.smoothquant import (
    channel_absmax,
    collect_act_absmax,
    smooth,
    smooth_linear_pair,
    smoothing_factors,
    smoothquant_rules,
    update_absmax,
)

__all__ = [
    "AdaRoundConfig",
    "LLMInt8DotGeneral",
    "LayerReport",
    "adaround",
    "apply_llm_int8",
    "channel_absmax",
    "collect_act_absmax",
    "llm_int8_matmul",
    "outlier_mask",
    "outlier_stats",
    "smooth",
    "smooth_linear_pair",
    "smoothing_factors",
    "smoothquant_rules",
    "update_absmax",
]
