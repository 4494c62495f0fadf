"""Training utilities for any NNX model, quantized or not: an optax train step, orbax checkpoints
that resume exactly, data-parallel / FSDP sharding that covers quantizer state and QArrays, and
knowledge-distillation losses on logits."""

from qjax.training.checkpoint import (
    CheckpointDamaged,
    RestoredCheckpoint,
    TrainingCheckpointer,
    default_sharding,
)
from qjax.training.data import DataPosition, batch_indices, epoch_order
from qjax.training.distill import distillation_loss, token_cross_entropy, token_kl
from qjax.training.sharding import (
    follow_spec,
    fsdp_spec,
    largest_divisible_axis,
    make_global_batch,
    make_mesh,
    partition_specs,
    process_rows,
    replicate,
    shard_batch,
    shard_model,
    shard_optimizer,
    state_shardings,
)
from qjax.training.step import LossWatch, TrainingDiverged, make_eval_step, make_optimizer, make_train_step

__all__ = [
    "CheckpointDamaged",
    "DataPosition",
    "LossWatch",
    "RestoredCheckpoint",
    "TrainingCheckpointer",
    "TrainingDiverged",
    "batch_indices",
    "default_sharding",
    "distillation_loss",
    "epoch_order",
    "follow_spec",
    "fsdp_spec",
    "largest_divisible_axis",
    "make_eval_step",
    "make_global_batch",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "partition_specs",
    "process_rows",
    "replicate",
    "shard_batch",
    "shard_model",
    "shard_optimizer",
    "state_shardings",
    "token_cross_entropy",
    "token_kl",
]
