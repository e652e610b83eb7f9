"""GPU memory planner for DuDe / LoRA-family fine-tuning, from a model config alone.

Run ``python -m dude_trl.plan MODEL [options]``. ``MODEL`` is a bundled short name
(``qwen2.5-32b``), its hub id (``Qwen/Qwen2.5-32B``, resolved offline to the bundled
config), a local model directory, a ``config.json`` path, or (online only) any hub id.

Levels, each importing only from the ones above it:

  inventory   config resolution, the meta-device model inventory, adapter targets and counts
  memory      the per-GPU byte model of one run (``PlanRequest`` -> ``MemoryPlan``)
  deepspeed   DeepSpeed's own estimators next to the planner's full fine-tuning accounting
  report      text output of plans and comparisons
  __main__    the command line (not imported by the package)

This package re-exports their public names, so ``from dude_trl.plan import plan_memory`` works.
torch, transformers and deepspeed are imported only when a model is inspected or estimated.
"""

from __future__ import annotations

from .deepspeed import compare_with_deepspeed, deepspeed_model_states
from .inventory import (
    BUNDLED_MODELS,
    MODEL_CONFIGS_DIR,
    LinearInfo,
    ModelInventory,
    PlanError,
    adapter_param_numels,
    available_linear_suffixes,
    bundled_model_names,
    count_trainable_params,
    inspect_model,
    load_model_config,
    select_targets,
)
from .memory import (
    BF16_BYTES,
    CUDA_OVERHEAD_BYTES,
    GIB,
    LOGIT_BYTES_PER_ENTRY,
    NF4_BITS_PER_PARAM,
    NF4_CONSTANT_BYTES_PER_PARAM,
    NF4_DATA_BYTES_PER_PARAM,
    ZERO3_SUB_GROUP_SIZE,
    MemoryPlan,
    PlanRequest,
    activation_bytes,
    head_bytes,
    layer_activation_bytes_per_token,
    plan_memory,
)
from .report import format_comparison, format_plan, format_summary

__all__ = [
    "GIB",
    "BF16_BYTES",
    "NF4_BITS_PER_PARAM",
    "NF4_DATA_BYTES_PER_PARAM",
    "NF4_CONSTANT_BYTES_PER_PARAM",
    "CUDA_OVERHEAD_BYTES",
    "ZERO3_SUB_GROUP_SIZE",
    "LOGIT_BYTES_PER_ENTRY",
    "MODEL_CONFIGS_DIR",
    "BUNDLED_MODELS",
    "PlanError",
    "bundled_model_names",
    "load_model_config",
    "LinearInfo",
    "ModelInventory",
    "inspect_model",
    "select_targets",
    "available_linear_suffixes",
    "adapter_param_numels",
    "count_trainable_params",
    "PlanRequest",
    "MemoryPlan",
    "plan_memory",
    "layer_activation_bytes_per_token",
    "activation_bytes",
    "head_bytes",
    "deepspeed_model_states",
    "compare_with_deepspeed",
    "format_plan",
    "format_summary",
    "format_comparison",
]
