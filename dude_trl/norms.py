"""The detached row norm ``||W + s B A||_row`` of a DuDe layer, without an ``out x in`` temporary.

The squared row norm is expanded as

    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T,

where ``||W_i||^2`` is constant (the residual is frozen), ``W A^T`` is ``out x r`` and
``A A^T`` is ``r x r``; rows where the expansion cancels are recomputed directly. The norm is
detached (DoRA sec. 4.3), so it is cached until an optimizer step, a change of A, B, the
residual or the scaling, or a state-dict load, and reused by every micro-batch and by
gradient-checkpointing recomputes. On a GPU its cost is kernel launches, so the layers of one
model and shape (every q_proj, every v_proj) compute it together in batched operations.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
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
_PEERS = "_dude_norm_peers"  # module attribute: {adapter: _NormPeers}
_RESIDUAL_SQ = "_dude_residual_sq"  # module attribute: (key, ||W_i||^2)

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
        drop_norm_caches(module)


def drop_norm_caches(module: nn.Module, *_: Any, **__: Any) -> None:
    module.__dict__.pop(_NORMS, None)
    module.__dict__.pop(_RESIDUAL_SQ, None)


def install_cache_invalidation(module: nn.Module) -> None:
    """Drop the module's cached norms whenever its state dict is loaded (resume, reload), and
    register it so that ``invalidate_norm_caches()`` reaches it."""
    _cached_modules.add(module)
    if not getattr(module, "_dude_cache_hook_installed", False):
        module.register_load_state_dict_post_hook(drop_norm_caches)
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
    base_layer = innermost_base_layer(module)
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
    base_layer = innermost_base_layer(first)
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
        W_At = _stack([residual_times(innermost_base_layer(m), A[i], fan_in_fan_out) for i, m in enumerate(modules)])
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
                _residual_rows(innermost_base_layer(m), rows[i].to(weight.device), fan_in_fan_out) for i, m in enumerate(modules)
            ]).to(A.device)
            B_rows = torch.gather(B, 1, rows.unsqueeze(-1).expand(-1, -1, B.shape[2]))
            direct_sq = torch.baddbmm(direct, B_rows, A, alpha=scaling).square_().sum(dim=2)
            norm_sq.scatter_(1, rows, torch.where(cancelled, direct_sq, norm_sq.gather(1, rows)))
        # A zero row would divide by zero.
        return norm_sq.clamp_min_(torch.finfo(torch.float32).tiny).sqrt_()


def _batch_key(module: nn.Module, adapter: str) -> Optional[tuple]:
    """What layers must share for `_compute_norms` to take them together, or None for a layer that
    is computed alone (quantized, ZeRO-3 partitioned, ``fan_in_fan_out``, merged or disabled)."""
    base_layer = innermost_base_layer(module)
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


class _NormPeers:
    """The DuDe layers of one model and adapter, which compute their norms together.

    Every layer of the model holds the same instance (in its ``__dict__``, outside the state dict).
    A deep copy (TRL's reference model) or an unpickled model gets a new, empty one shared by its
    own layers, which join it as each computes its first norm: a copy never batches with the
    original's layers, and copying one layer never copies the others."""

    def __init__(self, modules: tuple = ()):
        self.modules: list[nn.Module] = list(modules)

    def join(self, module: nn.Module) -> None:
        if not any(m is module for m in self.modules):
            self.modules.append(module)

    def __deepcopy__(self, memo: dict) -> "_NormPeers":
        return _NormPeers()

    def __getstate__(self) -> dict:
        return {"modules": []}


def link_norm_peers_(modules: list[nn.Module], adapter: str) -> None:
    """Let the DuDe layers of one model (`adapter`'s) compute their norms together (`_stale_peers`)."""
    peers = _NormPeers(tuple(modules))
    for module in modules:
        module.__dict__.setdefault(_PEERS, {})[adapter] = peers


def _stale_peers(module: nn.Module, adapter: str) -> list[tuple[nn.Module, tuple]]:
    """The other layers of `module`'s model (`link_norm_peers_`) whose norm its computation can
    include, with their cache keys: the same `_batch_key` and no valid cached norm."""
    peers = module.__dict__.get(_PEERS, {}).get(adapter)
    batch_key = _batch_key(module, adapter)
    if peers is None or batch_key is None:
        return []
    peers.join(module)
    stale = []
    for peer in peers.modules:
        if peer is module or adapter not in peer.lora_A or _batch_key(peer, adapter) != batch_key:
            continue  # (an adapter deleted from a layer leaves the layer in the list)
        key = _norm_key(peer.lora_A[adapter].weight, peer.lora_B[adapter].weight, innermost_base_layer(peer).weight,
                        peer.scaling[adapter])
        cached = peer.__dict__.get(_NORMS, {}).get(adapter)
        if cached is None or cached[0] != key:
            stale.append((peer, key))
    return stale


def innermost_base_layer(module: nn.Module) -> nn.Module:
    """`module.get_base_layer()` without the exception `hasattr` raises on every call."""
    base = module._modules["base_layer"]
    while "base_layer" in base._modules:
        base = base._modules["base_layer"]
    return base


def dude_weight_norm(module: nn.Module, adapter: str, base_layer: Optional[nn.Module] = None) -> torch.Tensor:
    """Detached row norms ``||W + s B A||_row`` (float32, shape ``out``), cached until an
    optimizer step, a change of A, B, the residual or the scaling, or a state-dict load; a miss
    computes the norms of the model's other stale layers of the same shape with it.
    `base_layer` is `module`'s innermost base layer, when the caller already has it."""
    A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    weight = (base_layer if base_layer is not None else innermost_base_layer(module)).weight
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
