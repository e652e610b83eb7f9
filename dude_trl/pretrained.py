"""The pretrained model behind a DuDe layer: what PEFT's adapter-free paths compute and return.

An SVD method (``dude``, ``dude_a``, ``dude_b``, ``pissa``) stores the residual ``W0 - s B0 A0``
as its layer's frozen base weight; that adapter is the layer's *residual owner*
(`dude_trl.layers.residual_owner`). PEFT's paths that leave an adapter out run or hand out the
base layer as it is: ``with model.disable_adapter():`` (reference log-probs in DPO/KL
pipelines), `set_adapter` to another adapter, `unload()`, `delete_adapter()`. On their own they
would give the residual model, not the pretrained one. Each owning layer therefore gets its
principal part ``s B0 A0`` back on those paths:

- in the forward, a hook adds ``s B0 (A0 x)`` (a rank-r product, nothing ``out x in``) whenever
  the owner's own update is not part of the output: adapters disabled, another adapter active,
  or merged weights that do not include the owner;
- `unload()` and `merge_and_unload()` (through PEFT's per-layer ``unload_and_optionally_merge_module``)
  and `delete_adapter(owner)` write ``s B0 A0`` back into the base weight first.

On a bitsandbytes base the forward computes ``deq(q(W_res)) x + s B0 A0 x`` (what QDuDe's
initialisation made close to ``W0``, closer than plain ``deq(q(W0))``), and a base weight written
back is quantized afresh: ``q(deq(q(W_res)) + s B0 A0)``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn

from .bases.bnb_storage import is_bnb_layer, set_quantized_weight_
from .bases.full import stored_weight, write_weight
from .layers import FINGERPRINT, INIT_A, INIT_B, held_buffer, principal_part, residual_owner
from .norms import invalidate_norm_caches


def owner_in_output(module: LoraLayer, owner: str) -> bool:
    """Whether the layer's output includes the owner's update (and so its principal part)."""
    if module.merged:
        return owner in module.merged_adapters
    return not module.disable_adapters and owner in module.active_adapters


#: `module.__dict__` key holding the residual owner's name for the forward hook: it runs on every
#: forward of the layer, and a plain attribute is cheaper to read than the init-factor buffers.
_OWNER = "_dude_residual_owner"


def add_principal_output(module: LoraLayer, args: tuple, kwargs: dict, output: torch.Tensor) -> Optional[torch.Tensor]:
    """Forward hook: ``output + s B0 (A0 x)`` whenever the residual owner's update is left out."""
    owner = module.__dict__.get(_OWNER)
    if owner is None:
        return None
    if kwargs.get("adapter_names") is not None:  # rows with other adapters (or "__base__") would see the residual
        raise ValueError(
            f"adapter_names= (mixed-adapter batches) is not supported on a layer holding the DuDe residual of "
            f"adapter {owner!r}: its base weight is not the pretrained one. Run one adapter per batch (set_adapter)."
        )
    if owner_in_output(module, owner):
        return None
    if not module.merged and not module.disable_adapters:
        _refuse_weight_norm_guests(module, owner)
    x = args[0] if args else kwargs["x"]
    A0, B0 = held_buffer(module, INIT_A, owner), held_buffer(module, INIT_B, owner)
    correction = F.linear(F.linear(x.to(A0.dtype), A0), B0) * module.scaling[owner]
    return output + correction.to(output.dtype)


def _refuse_weight_norm_guests(module: LoraLayer, owner: str) -> None:
    for adapter in module.active_adapters:
        if adapter != owner and adapter in module.lora_variant:
            raise ValueError(
                f"Adapter {adapter!r} normalises its update by the layer's base weight (DoRA), but that weight holds "
                f"the DuDe residual of adapter {owner!r}, so its magnitude and norm are not the pretrained model's. "
                f"Add the second adapter as a plain LoRA adapter, or load it onto its own copy of the base model."
            )


def restore_pretrained_weight_(module: LoraLayer, owner: str) -> None:
    """Write ``s B0 A0`` back into the base weight (quantized afresh on a bitsandbytes base).
    Gathers the weight under ZeRO-3."""
    base = module.get_base_layer()
    with gather_params_ctx([base.weight], modifier_rank=0):
        weight = stored_weight(module) + principal_part(module, owner).to(base.weight.device)
        if is_bnb_layer(base):
            set_quantized_weight_(base, weight)
        else:
            write_weight(module, weight)
    invalidate_norm_caches(module)


def unload_layer(
    module: LoraLayer, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
) -> nn.Module:
    """PEFT's per-layer unloading (``unload_and_optionally_merge_module``): merge if asked, then hand
    out the base layer holding the pretrained weight plus whatever was merged into it."""
    if merge:
        module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
    owner = residual_owner(module)
    if owner is not None and owner not in module.merged_adapters:
        restore_pretrained_weight_(module, owner)
    return module.get_base_layer()


def delete_adapter_from_layer(module: LoraLayer, adapter_name: str) -> None:
    """PEFT's layer `delete_adapter`, after giving the base its pretrained weight back when the
    deleted adapter owns the residual; drops the adapter's DuDe buffers."""
    if residual_owner(module) == adapter_name:
        restore_pretrained_weight_(module, adapter_name)
        module.__dict__.pop(_OWNER, None)
    for attr in (INIT_A, INIT_B, FINGERPRINT):
        buffers = getattr(module, attr, None)
        if buffers is not None and adapter_name in buffers:
            del buffers[adapter_name]
    type(module).delete_adapter(module, adapter_name)


def install_pretrained_view_(module: LoraLayer) -> None:
    """Give `module` (a layer holding a DuDe residual) its pretrained weight back on PEFT's
    adapter-free paths (module docstring). Idempotent.

    The unloading and deletion entry points are per-instance `functools.partial` attributes, so a
    `copy.deepcopy` of the model (TRL's reference models) or a pickle keeps them bound to the copy.
    """
    module.__dict__[_OWNER] = residual_owner(module)
    if add_principal_output not in module._forward_hooks.values():
        module.register_forward_hook(add_principal_output, with_kwargs=True)
    module.unload_and_optionally_merge_module = functools.partial(unload_layer, module)
    module.delete_adapter = functools.partial(delete_adapter_from_layer, module)

