"""The DuDe forward, as a PEFT LoRA variant (`DuDeLinearVariant`).

PEFT's `DoraLinearVariant` owns the magnitude vector's creation; the maths is DoRA's. The
forward differs: PEFT builds the full ``out x in`` matrix ``W + s*B@A`` on every call to take
its row norms. `DuDeLinearVariant` instead expands the squared row norm,

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T,

where ``||W_i||^2`` is constant (the residual is frozen), ``W A^T`` is ``out x r`` and
``A A^T`` is ``r x r``. The norm is detached (DoRA sec. 4.3), so it is computed once per
optimizer step and reused by every micro-batch and by gradient-checkpointing recomputes; the
layers of one model and shape compute it together, in batched operations, since on a GPU its
cost is kernel launches (`_compute_norms`). lora_B's matmul and the row scaling are one autograd function that accumulates into the base
output and keeps a single ``tokens x out`` tensor (in the base output's dtype) for the
magnitude gradient. Merge and unmerge are exact: unmerge puts back the very weight that merge
replaced.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from peft.tuners.lora.variants import DoraLinearVariant
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

#: Set to False to recompute the row norm on every forward (tests compare both paths).
CACHE_NORMS = True

#: Rows whose expanded squared norm falls below this fraction of ``||W_i||^2 + s^2 ||(BA)_i||^2``
#: lost most of their significant digits to cancellation; they are recomputed directly.
CANCELLATION_RATIO = 1e-3

#: How many of a layer's rows (the most cancelled ones) the guard can recompute per norm computation.
GUARDED_ROWS = 32

#: Largest float32 temporary (elements, 64 MiB) when a low-precision residual is upcast chunk by
#: chunk: a 7B model's attention projections take one chunk (few kernel launches), a 70B MLP a few.
_CHUNK_ELEMENTS = 1 << 24

_NORMS = "_dude_norms"  # module attribute: {adapter: (key, norm)}
_PEERS = "_dude_norm_peers"  # module attribute: {adapter: [the model's DuDe layers of that adapter]}
_RESIDUAL_SQ = "_dude_residual_sq"  # module attribute: (key, ||W_i||^2)
_UNMERGE = "_dude_unmerge"  # module attribute: {adapter: (weight before merge, norm, merged data_ptr)}

# Bumped after every optimizer step anywhere in the process (torch's global step hook also
# fires for the torch optimizers DeepSpeed drives), so a cached norm never outlives the A, B
# it was computed from, even when an optimizer writes through `.data` without bumping
# `Tensor._version` (DeepSpeed copies updated fp32 partitions back that way).
_generation = 0
_cached_modules: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _bump_generation(*_: Any) -> None:
    global _generation
    _generation += 1


register_optimizer_step_post_hook(_bump_generation)


def invalidate_norm_caches(model: Optional[nn.Module] = None) -> None:
    """Forget the cached DuDe row norms of `model`'s layers (of every layer when None).

    Needed only after writing A, B or the residual through a path the cache cannot see, such as
    ``param.data.copy_(...)`` or DeepSpeed restoring partitions outside `load_state_dict`;
    optimizer steps, `load_state_dict`, merge and unmerge are tracked automatically.
    """
    modules = list(_cached_modules) if model is None else list(model.modules())
    for module in modules:
        _drop_caches(module)


def _drop_caches(module: nn.Module, *_: Any, **__: Any) -> None:
    module.__dict__.pop(_NORMS, None)
    module.__dict__.pop(_RESIDUAL_SQ, None)


def install_cache_invalidation(module: nn.Module) -> None:
    """Drop the module's cached norms whenever its state dict is loaded (resume, reload), and
    register it so that ``invalidate_norm_caches()`` reaches it."""
    _cached_modules.add(module)
    if not getattr(module, "_dude_cache_hook_installed", False):
        module.register_load_state_dict_post_hook(_drop_caches)
        module._dude_cache_hook_installed = True


def is_quantized_layer(base_layer: nn.Module) -> bool:
    """True for a bitsandbytes layer, whose weight is packed and must be dequantized to be read."""
    return type(base_layer).__module__.startswith("bitsandbytes")


def _row_chunks(weight: torch.Tensor, fan_in_fan_out: bool):
    """Float32 slices of the ``out x in`` view of `weight`, at most `_CHUNK_ELEMENTS` each, so a
    bf16/fp16 weight is never upcast whole. Yields ``(row_slice, chunk)``."""
    out_features = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    in_features = weight.numel() // max(out_features, 1)
    step = out_features if weight.dtype == torch.float32 else max(1, _CHUNK_ELEMENTS // max(in_features, 1))
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        chunk = weight[:, rows].T if fan_in_fan_out else weight[rows]
        yield rows, chunk.float()


def residual_times(base_layer: nn.Module, A: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``A @ W^T`` (``r x out``) for the layer's frozen weight W, without forming a new
    ``out x in`` matrix: a quantized layer runs its own kernel on the rows of A; a bf16/fp16
    weight is upcast to float32 in bounded row chunks."""
    if is_quantized_layer(base_layer):
        out = base_layer(A.to(base_layer.compute_dtype if hasattr(base_layer, "compute_dtype") else A.dtype))
        if base_layer.bias is not None:
            out = out - base_layer.bias
        return out
    weight = base_layer.weight
    if weight.dtype == A.dtype:
        return A @ weight if fan_in_fan_out else A @ weight.T
    A = A.float()
    chunks = _row_chunks(weight, fan_in_fan_out)
    rows, chunk = next(chunks)
    if rows.stop == (weight.shape[1] if fan_in_fan_out else weight.shape[0]):
        return A @ chunk.T
    out = torch.empty(A.shape[0], weight.shape[1] if fan_in_fan_out else weight.shape[0], device=A.device)
    out[:, rows] = A @ chunk.T
    for rows, chunk in chunks:
        out[:, rows] = A @ chunk.T
    return out


def residual_row_sq_norms(base_layer: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """Squared L2 norm of each output row of the frozen weight, in float32."""
    if is_quantized_layer(base_layer):
        weight = dequantize_module_weight(base_layer)
        return weight.float().square().sum(dim=0 if fan_in_fan_out else 1)
    weight = base_layer.weight
    out = torch.empty(weight.shape[1] if fan_in_fan_out else weight.shape[0], device=weight.device)
    for rows, chunk in _row_chunks(weight, fan_in_fan_out):
        out[rows] = chunk.square().sum(dim=1)
    return out


def _residual_rows(base_layer: nn.Module, rows: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The given output rows of the frozen weight (``len(rows) x in``, float32)."""
    weight = dequantize_module_weight(base_layer) if is_quantized_layer(base_layer) else base_layer.weight
    return (weight[:, rows].T if fan_in_fan_out else weight[rows]).float()


@contextmanager
def _gathered(params: list[torch.Tensor]) -> Iterator[None]:
    """Gather the ZeRO-3 partitioned tensors among `params` that are not already gathered, and
    release only those. Inside a forward ZeRO-3 has gathered all of them (it registers a
    module's weights as external parameters of the LoRA layer at their first use), so a norm
    recomputed on one rank only runs no collective and frees nothing another call expects."""
    missing = [p for p in params if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    if not missing:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
        yield


def _norm_key(A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor, scaling: float) -> tuple:
    """What a cached norm depends on. Under ZeRO-3 (`ds_id`) addresses change at every gather,
    so only the optimizer-step generation and the version counters are used there."""
    if hasattr(weight, "ds_id"):
        return (_generation, A._version, B._version, scaling)
    return (_generation, A._version, B._version, A.data_ptr(), B.data_ptr(), weight._version, weight.data_ptr(), scaling)


def _residual_sq(module: nn.Module) -> torch.Tensor:
    """``||W_i||^2`` of the layer's frozen weight, cached until the weight changes."""
    base_layer = _base_layer(module)
    weight = base_layer.weight
    key = None if hasattr(weight, "ds_id") else (weight._version, weight.data_ptr())
    cached = module.__dict__.get(_RESIDUAL_SQ)
    if cached is None or cached[0] != key:
        cached = (key, residual_row_sq_norms(base_layer, getattr(module, "fan_in_fan_out", False)))
        module.__dict__[_RESIDUAL_SQ] = cached
    return cached[1]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _compute_norms(modules: list[nn.Module], adapter: str) -> torch.Tensor:
    """Row norms ``||W + s B A||_row`` of layers that share shapes, dtypes, device and scaling
    (`_batch_key`), computed together (``len(modules) x out``): on a GPU this runs once per step
    and costs kernel launches, so a model's q (or v) projections share one set of batched ones."""
    first = modules[0]
    base_layer = _base_layer(first)
    weight = base_layer.weight
    fan_in_fan_out = getattr(first, "fan_in_fan_out", False)
    scaling = first.scaling[adapter]
    A0, B0 = first.lora_A[adapter].weight, first.lora_B[adapter].weight
    # Cached tensors must be usable by autograd later, also when first computed under inference_mode.
    # Autocast off: the expansion amplifies bf16 rounding, and the cached value must not depend
    # on whether it was first computed inside or outside an autocast region.
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        torch.autocast(A0.device.type, enabled=False),
        _gathered([weight, A0, B0]),  # ZeRO-3 layers are never batched (`_batch_key`)
    ):
        A = _stack([m.lora_A[adapter].weight for m in modules]).float()  # n x r x in
        B = _stack([m.lora_B[adapter].weight for m in modules]).float()  # n x out x r
        residual_sq = _stack([_residual_sq(m) for m in modules]).to(A.device)
        W_At = _stack([residual_times(_base_layer(m), A[i], fan_in_fan_out) for i, m in enumerate(modules)])
        cross = (B * W_At.float().transpose(1, 2)).sum(dim=2)
        lora_sq = (torch.bmm(B, torch.bmm(A, A.transpose(1, 2))) * B).sum(dim=2)
        norm_sq = torch.add(residual_sq, cross, alpha=2 * scaling).add_(lora_sq, alpha=scaling**2)
        # Guard against cancellation: the rows shortest relative to their parts are recomputed
        # directly when below CANCELLATION_RATIO. A fixed count (topk) keeps this free of the
        # host sync that selecting by a mask would cost on a GPU.
        parts = torch.add(residual_sq, lora_sq, alpha=scaling**2).clamp_min_(torch.finfo(torch.float32).tiny)
        lowest, rows = torch.topk(norm_sq / parts, min(GUARDED_ROWS, norm_sq.shape[1]), dim=1, largest=False)
        cancelled = lowest <= CANCELLATION_RATIO
        # A quantized base dequantizes whole, so there it is worth a sync to skip it when no row needs it.
        if not is_quantized_layer(base_layer) or bool(cancelled.any()):
            direct = _stack([
                _residual_rows(_base_layer(m), rows[i].to(weight.device), fan_in_fan_out) for i, m in enumerate(modules)
            ]).to(A.device)
            B_rows = torch.gather(B, 1, rows.unsqueeze(-1).expand(-1, -1, B.shape[2]))
            direct_sq = torch.baddbmm(direct, B_rows, A, alpha=scaling).square_().sum(dim=2)
            norm_sq.scatter_(1, rows, torch.where(cancelled, direct_sq, norm_sq.gather(1, rows)))
        # A zero row would divide by zero.
        return norm_sq.clamp_min_(torch.finfo(torch.float32).tiny).sqrt_()


def _batch_key(module: nn.Module, adapter: str) -> Optional[tuple]:
    """What layers must share for `_compute_norms` to take them together, or None for a layer that
    is computed alone (quantized, ZeRO-3 partitioned, ``fan_in_fan_out``, merged or disabled)."""
    base_layer = _base_layer(module)
    weight = base_layer.weight
    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if (
        is_quantized_layer(base_layer)
        or hasattr(weight, "ds_id")
        or hasattr(A, "ds_id")
        or getattr(module, "fan_in_fan_out", False)
        or module.merged
        or module.disable_adapters
    ):
        return None
    return (weight.device, weight.dtype, weight.shape, A.device, A.dtype, A.shape, B.dtype, module.scaling[adapter])


def link_norm_peers_(modules: list[nn.Module], adapter: str) -> None:
    """Let the DuDe layers of one model (`adapter`'s) compute their norms together (`_stale_peers`).

    The shared list lives in each layer's ``__dict__``: a deep copy of the model (TRL's reference
    model) gets its own list of its own layers, and the modules' state dicts do not change."""
    peers = list(modules)
    for module in peers:
        module.__dict__.setdefault(_PEERS, {})[adapter] = peers


def _stale_peers(module: nn.Module, adapter: str) -> list[tuple[nn.Module, tuple]]:
    """The other layers of `module`'s model (`link_norm_peers_`) whose norm its computation can
    include, with their cache keys: the same `_batch_key` and no valid cached norm."""
    batch_key = _batch_key(module, adapter)
    if batch_key is None:
        return []
    stale = []
    for peer in module.__dict__.get(_PEERS, {}).get(adapter, ()):
        if peer is module or _batch_key(peer, adapter) != batch_key:
            continue
        key = _norm_key(peer.lora_A[adapter].weight, peer.lora_B[adapter].weight, _base_layer(peer).weight,
                        peer.scaling[adapter])
        cached = peer.__dict__.get(_NORMS, {}).get(adapter)
        if cached is None or cached[0] != key:
            stale.append((peer, key))
    return stale


def _base_layer(module: nn.Module) -> nn.Module:
    """`module.get_base_layer()` without the exception `hasattr` raises on every call."""
    base = module._modules["base_layer"]
    while "base_layer" in base._modules:
        base = base._modules["base_layer"]
    return base


def dude_weight_norm(module: nn.Module, adapter: str) -> torch.Tensor:
    """Detached row norms ``||W + s B A||_row`` (float32, shape ``out``), cached until an
    optimizer step, a change of A, B, the residual or the scaling, or a state-dict load."""
    return _cached_norm(module, adapter, _base_layer(module).weight)


def _cached_norm(module: nn.Module, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    A = module.lora_A[adapter].weight
    B = module.lora_B[adapter].weight
    key = _norm_key(A, B, weight, module.scaling[adapter])
    norms = module.__dict__.get(_NORMS)
    if norms is None:
        norms = module.__dict__[_NORMS] = {}
        _cached_modules.add(module)
    cached = norms.get(adapter)
    if CACHE_NORMS and cached is not None and cached[0] == key:
        return cached[1]
    if not CACHE_NORMS:
        return _compute_norms([module], adapter)[0]
    members = [(module, key)] + _stale_peers(module, adapter)
    computed = _compute_norms([m for m, _ in members], adapter)
    for i, (member, member_key) in enumerate(members):
        member.__dict__.setdefault(_NORMS, {})[adapter] = (member_key, computed[i])
    return computed[0]


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
            if bias is not None:  # `pre` is a fresh tensor: W x + s h B^T without the bias
                pre.sub_(bias)
            out = torch.empty_like(result)
            if bias is None:
                torch.mul(pre.view(result.shape), scale, out=out)
            else:
                torch.addcmul(bias, pre.view(result.shape), scale, out=out)
            pre_without_bias = pre.to(result.dtype) if training and ctx.needs_input_grad[3] else None
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
        _drop_caches(module)
        merged, norm = _merged_weight(module, active_adapter, orig_weight, safe_merge=True)
        # `orig_weight` is the caller's private copy of the weight before this merge: keep it.
        _remember_unmerge(module, active_adapter, orig_weight.detach(), norm, merged)
        return merged

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        _drop_caches(module)
        merged, norm = _merged_weight(module, active_adapter, orig_weight, safe_merge=False)
        before = orig_weight.data
        orig_weight.data = merged
        _remember_unmerge(module, active_adapter, before, norm, merged)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """The weight as it was before the merge, bit for bit, when the merged weight is still
        the one merge produced (a quantized layer passes a fresh dequantized copy, so it always
        gets the stored weight back); otherwise the merge inverted in float32."""
        _drop_caches(module)
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
        base_layer = _base_layer(module)
        norm = _cached_norm(module, active_adapter, base_layer.weight)
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
