"""The DuDe forward, as a PEFT LoRA variant (`DuDeLinearVariant`).

PEFT's `DoraLinearVariant` owns the magnitude vector's creation; the maths is DoRA's. The
forward differs: PEFT builds the full ``out x in`` matrix ``W + s*B@A`` on every call to take
its row norms; `DuDeLinearVariant` takes them from `dude_trl.norms` (an expansion that needs
no such matrix, computed once per optimizer step). lora_B's matmul and the row scaling are one
autograd function that accumulates into the base output and keeps a single ``tokens x out``
tensor (in the base output's dtype) for the magnitude gradient. Merge and unmerge are exact:
unmerge puts back the very weight that merge replaced.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from .norms import drop_norm_caches, dude_weight_norm, innermost_base_layer, install_cache_invalidation, is_quantized_layer

_UNMERGE = "_dude_unmerge"  # module attribute: {adapter: (weight before merge, norm, merged data_ptr)}


class _DuDeOutput(torch.autograd.Function):
    """``out = m / norm * (result - bias + s * h @ B^T) + bias``, `norm` a constant.

    `result` is the base layer's output ``W x + bias`` and ``h = A dropout(x)``. Taking over
    lora_B's matmul lets it accumulate straight into the base output (``addmm``) and, in
    backward, fold the per-row scale into B (an ``out x r`` matrix) instead of scaling a
    ``tokens x out`` gradient. Saved for backward: ``h``, and one ``tokens x out`` tensor in the
    base output's dtype for the magnitude gradient. The bracket is accumulated in float32
    whenever the base and the adapter dtypes differ (bf16 base, float32 adapters), so the
    output is rounded once.
    """

    @staticmethod
    def forward(ctx, result, h, B, magnitude, norm, scaling, bias, training):  # type: ignore[override]
        with torch.autocast(result.device.type, enabled=False):
            scale = magnitude.detach().float() / norm
            h2 = h.reshape(-1, h.shape[-1])
            result2 = result.reshape(-1, result.shape[-1])
            if result.dtype == h.dtype:
                pre = torch.addmm(result2, h2, B.to(h.dtype).t(), alpha=scaling)
            else:
                pre = result2.to(torch.float32, copy=True).addmm_(h2.float(), B.float().t(), alpha=scaling)
            save_pre = training and ctx.needs_input_grad[3]
            out = torch.empty_like(result)
            if bias is None:
                torch.mul(pre.view(result.shape), scale, out=out)
            elif save_pre:  # the magnitude gradient needs W x + s h B^T without the bias: `pre` is ours
                pre.sub_(bias)
                torch.addcmul(bias, pre.view(result.shape), scale, out=out)
            else:  # inference: one pass over the output
                torch.addcmul(bias * (1 - scale), pre.view(result.shape), scale, out=out)
            pre_without_bias = pre.to(result.dtype) if save_pre else None
        ctx.save_for_backward(pre_without_bias, h, B, scale, norm)
        ctx.scaling = scaling
        ctx.dtypes = (result.dtype, magnitude.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        pre, h, B, scale, norm = ctx.saved_tensors
        result_dtype, magnitude_dtype = ctx.dtypes
        grad_result = grad_h = grad_B = grad_magnitude = None
        grad2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[3]:  # first: its temporary is freed before the other grads exist
            grad_magnitude = ((grad2 * pre).sum(dim=0, dtype=torch.float32) / norm).to(magnitude_dtype)
        if ctx.needs_input_grad[0]:
            grad_result = torch.mul(grad_out, scale, out=torch.empty_like(grad_out, dtype=result_dtype))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            row_factor = (scale * ctx.scaling)[:, None]  # d out / d (h B^T), per row, float32
            grad_mm = grad2.to(h.dtype)
            if ctx.needs_input_grad[1]:
                scaled_B = torch.mul(B, row_factor, out=torch.empty(B.shape, dtype=h.dtype, device=B.device))
                grad_h = (grad_mm @ scaled_B).view(h.shape)
            if ctx.needs_input_grad[2]:
                h2 = h.reshape(-1, h.shape[-1])
                grad_B = torch.mul(grad_mm.t() @ h2, row_factor, out=torch.empty_like(B))
        grad_bias = None
        if ctx.needs_input_grad[6]:  # a trainable bias (`bias="all"`): d out / d bias = 1 - scale + scale (via result)
            grad_bias = (grad2.sum(dim=0, dtype=torch.float32) * (1 - scale)).to(ctx.bias_dtype)
        return grad_result, grad_h, grad_B, grad_magnitude, None, None, grad_bias, None


def _merged_weight(module: nn.Module, adapter: str, orig_weight: torch.Tensor, safe_merge: bool):
    """``m / ||W + s B A||_row * (W + s B A)`` in float32, in the stored layout, with the norm
    taken on the unmerged base (earlier merged adapters taken out, as the forward sees it)."""
    fan_in_fan_out = getattr(module, "fan_in_fan_out", False)
    A = module.lora_A[adapter].weight.float()
    B = module.lora_B[adapter].weight.float()
    with torch.autocast(A.device.type, enabled=False):
        delta = module.scaling[adapter] * (B @ A)  # out x in
    with module._unmerged_base_weight(safe_merge=safe_merge) as base_weight:
        unmerged = base_weight.T if fan_in_fan_out else base_weight
        norm = torch.linalg.vector_norm(unmerged.float().to(delta.device) + delta, dim=1)
    norm = norm.clamp_min(torch.finfo(torch.float32).tiny)
    factor = module.lora_magnitude_vector[adapter].weight.detach().float().to(delta.device) / norm
    current = orig_weight.detach().float().to(delta.device)
    current = current.T if fan_in_fan_out else current
    merged = factor[:, None] * (current + delta)
    merged = merged.T if fan_in_fan_out else merged
    return merged.to(orig_weight.device, orig_weight.dtype).contiguous(), norm


def _remember_unmerge(module: nn.Module, adapter: str, before: torch.Tensor, norm: torch.Tensor, merged) -> None:
    module.__dict__.setdefault(_UNMERGE, {})[adapter] = (before, norm, merged.data_ptr())


class DuDeLinearVariant(DoraLinearVariant):
    """DoRA's decomposition with a forward that never builds ``out x in`` temporaries.

    ``y = m / ||W + s B A||_row * (W x + s B A dropout(x)) + bias``. The base output
    ``W x + bias`` arrives as `result` (no second base matmul). Dropout applies to the
    low-rank branch only, as in PEFT's LoRA; PEFT's DoRA instead re-runs the base matmul on
    the dropped-out input, which costs a second full matmul per call.
    """

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        DoraLinearVariant.init(module, adapter_name, **kwargs)
        install_cache_invalidation(module)

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        drop_norm_caches(module)
        merged, norm = _merged_weight(module, active_adapter, orig_weight, safe_merge=True)
        # `orig_weight` is the caller's private copy of the weight before this merge: keep it.
        _remember_unmerge(module, active_adapter, orig_weight.detach(), norm, merged)
        return merged

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        drop_norm_caches(module)
        merged, norm = _merged_weight(module, active_adapter, orig_weight, safe_merge=False)
        before = orig_weight.data
        orig_weight.data = merged
        _remember_unmerge(module, active_adapter, before, norm, merged)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """The weight as it was before the merge, bit for bit, when the merged weight is still
        the one merge produced (a quantized layer passes a fresh dequantized copy, so it always
        gets the stored weight back); otherwise the merge inverted in float32."""
        drop_norm_caches(module)
        remembered = module.__dict__.get(_UNMERGE, {}).pop(active_adapter, None)
        if remembered is None:  # merged before DuDe's variant was installed
            return DoraLinearVariant.unmerge(module, active_adapter, orig_weight)
        before, norm, merged_ptr = remembered
        if is_quantized_layer(module.get_base_layer()) or orig_weight.data_ptr() == merged_ptr:
            return before.to(orig_weight.device, orig_weight.dtype)
        fan_in_fan_out = getattr(module, "fan_in_fan_out", False)
        A = module.lora_A[active_adapter].weight.float()
        B = module.lora_B[active_adapter].weight.float()
        factor = module.lora_magnitude_vector[active_adapter].weight.detach().float() / norm
        current = orig_weight.detach().float()
        current = current.T if fan_in_fan_out else current
        restored = current / factor[:, None] - module.scaling[active_adapter] * (B @ A)
        return (restored.T if fan_in_fan_out else restored).to(orig_weight.dtype).contiguous()

    @staticmethod
    def forward(
        module: nn.Module,
        active_adapter: str,
        x: torch.Tensor,
        result: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        base_layer = innermost_base_layer(module)
        norm = dude_weight_norm(module, active_adapter, base_layer)
        h = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))
        return _DuDeOutput.apply(
            result,
            h,
            module.lora_B[active_adapter].weight,
            module.lora_magnitude_vector[active_adapter].weight,
            norm,
            module.scaling[active_adapter],
            base_layer.bias,
            torch.is_grad_enabled(),  # needs_input_grad stays True under no_grad: skip the saved copy there
        )
