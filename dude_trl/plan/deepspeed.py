"""DeepSpeed's own model-state estimators, next to the planner's accounting of the same run.

DeepSpeed's estimators (``estimate_zero2/3_model_states_mem_needs``) assume full fine-tuning;
``--full-finetune`` switches the planner to that case and ``--compare-deepspeed`` prints both.
DeepSpeed is imported only when an estimate is asked for.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .inventory import ModelInventory, PlanError, inspect_model, load_model_config
from .memory import PlanRequest, plan_memory


def deepspeed_model_states(inv: ModelInventory, req: PlanRequest) -> dict[str, Any]:
    """DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs`` for this model and topology.

    These are the functions behind ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` (which
    only print). They assume every parameter is trainable. ``additional_buffer_factor=1.0`` so the
    CPU numbers are bare state sizes, comparable with the planner's. ZeRO-1/0 have no estimator.
    """
    if req.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=inv.total_params,
            largest_layer_params=inv.largest_module_params,
            num_gpus_per_node=req.local_gpus,
            num_nodes=req.nodes,
            cpu_offload=req.offload,
            cpu_offload_params=req.offload,
            zero_init=True,
            additional_buffer_factor=1.0,
        )
        name = "estimate_zero3_model_states_mem_needs"
    elif req.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=inv.total_params,
            num_gpus_per_node=req.local_gpus,
            num_nodes=req.nodes,
            cpu_offload=req.offload,
            additional_buffer_factor=1.0,
        )
        name = "estimate_zero2_model_states_mem_needs"
    else:
        raise PlanError("DeepSpeed ships model-state estimators for ZeRO-2 and ZeRO-3 only")
    return {"estimator": name, "gpu_bytes": int(gpu), "cpu_bytes_per_node": int(cpu)}


def compare_with_deepspeed(model: str, req: PlanRequest, inventory: ModelInventory | None = None) -> dict[str, Any]:
    """Planner (full fine-tune accounting) next to DeepSpeed's estimate, model states only."""
    if inventory is None:
        inventory = inspect_model(load_model_config(model))
    full = PlanRequest(**{**asdict(req), "full_finetune": True, "load_in_4bit": False})
    plan = plan_memory(model, full, inventory)
    reference = deepspeed_model_states(inventory, full)
    return {
        **reference,
        "planner_gpu_bytes": plan.model_states_per_gpu,
        "planner_cpu_bytes_per_node": plan.cpu_bytes_per_node,
        "gpu_ratio": plan.model_states_per_gpu / reference["gpu_bytes"],
        "offload": req.offload,
        "total_params": inventory.total_params,
        "largest_layer_params": inventory.largest_module_params,
    }
