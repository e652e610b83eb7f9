"""The planner's text output: one plan's breakdown, a table of several models, a DeepSpeed comparison."""

from __future__ import annotations

from typing import Any, Sequence

from .memory import GIB, MemoryPlan


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """Human-readable breakdown of one plan."""
    req = plan.request
    mode = "full fine-tune" if req.full_finetune else f"{req.method} r={req.r} on {','.join(req.target_modules)}"
    zero = f"ZeRO-{req.zero_stage}" if req.zero_stage else "no ZeRO (DDP)"
    lines = [
        f"model {plan.model}: {plan.total_params:,} params; trainable {plan.trainable_params:,} "
        f"({100 * plan.trainable_params / plan.total_params:.3f}%) in {plan.adapted_modules} modules [{mode}]",
        f"{req.num_gpus} GPU(s) ({req.nodes} node(s) x {req.local_gpus}), {zero}"
        f"{' + CPU offload' if req.offload else ''}, {'4-bit NF4' if req.load_in_4bit else 'bf16'} base, "
        f"seq {req.seq_len} x micro-batch {req.micro_batch}, gradient checkpointing "
        f"{'on' if req.gradient_checkpointing else 'off'}, attention {req.attn_implementation}",
        "",
        f"{'component':<24}{'GiB/GPU':>10}{'GiB CPU/node':>14}",
    ]
    for key in dict.fromkeys([*plan.gpu, *plan.cpu]):
        cpu = _gib(plan.cpu[key]) if key in plan.cpu else f"{'-':>8}"
        lines.append(f"{key:<24}{_gib(plan.gpu.get(key, 0)):>10}{cpu:>14}")
    lines.append(f"{'total':<24}{_gib(plan.per_gpu_bytes):>10}{_gib(plan.cpu_bytes_per_node):>14}")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"\n{verdict} in {req.gpu_memory_gb:g} GiB per GPU")
    return "\n".join(lines)


def format_summary(plans: Sequence[MemoryPlan]) -> str:
    """One row per model, for comparing several models under the same settings.

    Columns in GiB per GPU: base weights (frozen weights + ZeRO-3 gathered module), trainable
    states (adapter weights, gradients, optimizer), activations + logits, and the total.
    """
    header = (
        f"{'model':<18}{'params':>16}{'trainable':>13}{'base wts':>9}{'train st.':>10}"
        f"{'activ+logits':>13}{'GiB/GPU':>9}{'CPU GiB/node':>13}  fits"
    )
    rows = [header]
    for plan in plans:
        g = plan.gpu
        states = sum(g.get(k, 0) for k in ("adapter_weights", "trainable_weights", "gradients", "optimizer_states"))
        rows.append(
            f"{plan.model:<18}{plan.total_params:>16,}{plan.trainable_params:>13,}"
            f"{(g['frozen_weights'] + g.get('zero3_gathered_params', 0)) / GIB:>9.2f}{states / GIB:>10.3f}"
            f"{(g['activations'] + g['logits']) / GIB:>13.2f}{plan.per_gpu_bytes / GIB:>9.2f}"
            f"{plan.cpu_bytes_per_node / GIB:>13.2f}  {'yes' if plan.fits else 'NO'}"
        )
    return "\n".join(rows)


def format_comparison(comparison: dict[str, Any]) -> str:
    """Text block for ``--compare-deepspeed``."""
    cpu_note = "" if comparison["offload"] else " (DeepSpeed: load-time copies; planner: steady state)"
    return (
        f"DeepSpeed {comparison['estimator']} (full fine-tune, {comparison['total_params']:,} params, "
        f"largest layer {comparison['largest_layer_params']:,}):\n"
        f"  GPU per device: DeepSpeed {_gib(comparison['gpu_bytes']).strip()} GiB, planner "
        f"{_gib(comparison['planner_gpu_bytes']).strip()} GiB (ratio {comparison['gpu_ratio']:.3f})\n"
        f"  CPU per node:   DeepSpeed {_gib(comparison['cpu_bytes_per_node']).strip()} GiB, planner "
        f"{_gib(comparison['planner_cpu_bytes_per_node']).strip()} GiB{cpu_note}"
    )
