"""Post-training and training-time quantization methods built on :mod:`qjax.nn`.

* AdaRound (Nagel et al. 2020): :func:`adaround` (model integration, :mod:`qjax.methods.adaround`)
  over the math in :mod:`qjax.methods.adaround_core`.
* Mixed precision by sensitivity: :mod:`qjax.methods.mixed_precision`.
* k-means centroid fine-tuning (Deep Compression): :mod:`qjax.methods.kmeans_finetune`.
* SmoothQuant (Xiao et al. 2023): :func:`smoothing_factors`, :func:`smooth`, :func:`smoothquant_rules`
  (:mod:`qjax.methods.smoothquant`).
* GPTQ (Frantar et al. 2022): :func:`gptq_quantize` with Hessians from :func:`hessian_update`
  (:mod:`qjax.methods.gptq_core`).
* AWQ (Lin et al. 2023): :func:`awq_search`, :func:`awq_clip_search`, :func:`fold_scales`
  (:mod:`qjax.methods.awq_core`).
* LLM.int8() (Dettmers et al. 2022): :func:`llm_int8_matmul`, :func:`apply_llm_int8`
  (:mod:`qjax.methods.llm_int8`).
* Hadamard rotations of a Llama (QuaRot, Ashkboos et al. 2024): :func:`rotate_llama`,
  :func:`fuse_norms`, :func:`rotate_weights` (:mod:`qjax.methods.rotation`).
"""

from qjax.methods.adaround import LayerReport, adaround
from qjax.methods.adaround_core import AdaRoundConfig
from qjax.methods.awq_core import AWQResult, ClipResult, awq_clip_search, awq_search, fold_scales
from qjax.methods.gptq_core import (
    GPTQResult,
    HessianState,
    gptq_quantize,
    hessian,
    hessian_init,
    hessian_update,
)
from qjax.methods.llm_int8 import (
    LLMInt8DotGeneral,
    apply_llm_int8,
    llm_int8_matmul,
    outlier_mask,
    outlier_stats,
)
from qjax.methods.rotation import fuse_norms, rotate_llama, rotate_weights
from qjax.methods.smoothquant import (
    SmoothQuantLevel,
    channel_absmax,
    collect_act_absmax,
    smooth,
    smooth_linear_pair,
    smoothing_factors,
    smoothquant_rules,
    update_absmax,
)

__all__ = [
    "AWQResult",
    "AdaRoundConfig",
    "ClipResult",
    "GPTQResult",
    "HessianState",
    "LLMInt8DotGeneral",
    "LayerReport",
    "SmoothQuantLevel",
    "adaround",
    "apply_llm_int8",
    "awq_clip_search",
    "awq_search",
    "channel_absmax",
    "collect_act_absmax",
    "fold_scales",
    "fuse_norms",
    "gptq_quantize",
    "hessian",
    "hessian_init",
    "hessian_update",
    "llm_int8_matmul",
    "outlier_mask",
    "outlier_stats",
    "rotate_llama",
    "rotate_weights",
    "smooth",
    "smooth_linear_pair",
    "smoothing_factors",
    "smoothquant_rules",
    "update_absmax",
]
