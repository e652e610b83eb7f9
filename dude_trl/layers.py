"""The DuDe layers of a `PeftModel`: injecting them, finding them, and what each one stores
beside PEFT's own tensors.

PEFT injects its LoRA/DoRA layers (`get_peft_model` with a `DuDeConfig`, which is a
`LoraConfig`); DuDe then keeps, per layer and adapter, persistent buffers that PEFT saves with
the adapter because their names start with ``lora_``:

- `INIT_A` / `INIT_B`: the initial factors, from which the frozen residual ``W0 - s B0 A0`` is
  rebuilt exactly from the original base;
- `FINGERPRINT`: a few numbers identifying the original base weight (`dude_trl.fingerprint`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft import PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import NoMatchingPeftModuleError
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DuDeConfig
from .norms import install_cache_invalidation, link_norm_peers_
from .variant import DuDeLinearVariant

logger = logging.getLogger(__name__)

INIT_A = "lora_dude_init_A"
INIT_B = "lora_dude_init_B"
FINGERPRINT = "lora_dude_base_fingerprint"


def is_supported_base(module: nn.Module) -> bool:
    """True for the layer types DuDe adapts: Linear (bitsandbytes' Linear4bit / Linear8bitLt
    subclass it) and transformers' Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct last name components of `model`'s adaptable layers (for error messages)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_supported_base(m) and name})


@contextmanager
def peft_deprecations_silenced() -> Iterator[None]:
    """Silence the FutureWarning PEFT 0.21.2 triggers whenever it wraps a transformers 5 model: it
    reads the deprecated ``is_gradient_checkpointing``, a name the user never wrote and cannot change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def inject_adapter(model: nn.Module, config: DuDeConfig, adapter_name: str = "default") -> PeftModel:
    """`peft.get_peft_model`, with PEFT's "target modules not found" error restated to list the
    Linear layers `model` has. PEFT expands ``"all-linear"`` and per-architecture defaults."""
    try:
        with peft_deprecations_silenced():
            return get_peft_model(model, config, adapter_name=adapter_name)
    except NoMatchingPeftModuleError as err:
        raise ValueError(
            f"target_modules={config.target_modules!r} match no module of {type(model).__name__}. "
            f"Linear layers it has: {', '.join(linear_suffixes(model))}."
        ) from err


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear/Conv1D, also for a ZeRO-3 partitioned or packed quantized weight."""
    if isinstance(module, Conv1D):
        return module.nf, getattr(module.weight, "ds_shape", module.weight.shape)[0]
    return module.out_features, module.in_features


def dude_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` for every PEFT LoRA layer of `model` that holds `adapter_name`."""
    # `r` holds every adapted layer type (embeddings keep their factors elsewhere), so an
    # unsupported target reaches `check_dude_layers` instead of being skipped.
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.r
    ]


def check_dude_layers(layers: list[tuple[str, LoraLayer]], adapter_name: str, config: DuDeConfig) -> None:
    """Raise a `ValueError` naming the fix when a target is not a Linear/Conv1D layer or its rank
    exceeds ``min(out, in)``; a `RuntimeError` when a layer was already initialised."""
    for name, module in layers:
        base = module.get_base_layer()
        if not is_supported_base(base):
            raise ValueError(
                f"DuDe adapts Linear and Conv1D layers, but target {name!r} is a {type(base).__name__}; "
                f"remove it from target_modules."
            )
        out_features, in_features = weight_shape(base)
        r = module.r[adapter_name]
        if r > min(out_features, in_features):
            raise ValueError(
                f"r={r} exceeds min(out, in)={min(out_features, in_features)} for {name!r} "
                f"({out_features}x{in_features}); lower `r` or set a smaller `rank_pattern` entry for it."
            )
        if config.uses_svd_init and held_buffer(module, INIT_A, adapter_name) is not None:
            raise RuntimeError(f"Layer {name!r} already holds a DuDe initialisation for adapter {adapter_name!r}.")
        check_second_adapter(name, module, adapter_name, config)


def check_second_adapter(name: str, module: LoraLayer, adapter_name: str, config: DuDeConfig) -> None:
    """Refuse an adapter that would share layer `name`'s base weight wrongly with another one.

    A layer's base weight holds at most one residual ``W0 - s B0 A0``. Plain LoRA adapters compute
    on the pretrained weight (`dude_trl.pretrained` gives it back to them), but a second SVD
    adapter would decompose and overwrite the first one's residual, and a magnitude adapter takes
    its norm from the base weight, so neither can share a layer with an SVD adapter.
    """
    owner = residual_owner(module)
    if owner is not None and owner != adapter_name and (config.uses_svd_init or config.has_magnitude):
        raise ValueError(
            f"Layer {name!r} already holds the DuDe residual of adapter {owner!r}; a {config.method!r} adapter "
            f"{adapter_name!r} on it would {'replace that residual' if config.uses_svd_init else 'take its norm from it'} "
            f"and change adapter {owner!r}'s output. Add {adapter_name!r} with method='lora' (it computes on the "
            f"pretrained weight), or load it onto its own copy of the base model."
        )
    if config.uses_svd_init:
        magnitude_adapters = [a for a in module.lora_magnitude_vector if a != adapter_name]
        if magnitude_adapters:
            raise ValueError(
                f"Layer {name!r} holds the magnitude adapter {magnitude_adapters[0]!r}, whose norm is taken from the "
                f"base weight; a {config.method!r} adapter {adapter_name!r} would replace that weight by its residual. "
                f"Load {adapter_name!r} onto its own copy of the base model."
            )


def untie_shared_weights_(model: nn.Module, layers: list[tuple[str, LoraLayer]], config: DuDeConfig) -> None:
    """Give every SVD target whose base weight is shared with another module (tied input/output
    embeddings: ``lm_head`` on SmolLM2, Qwen2.5-0.5B, Llama 3.2) its own copy, and say so.

    The SVD methods write the residual ``W0 - s B0 A0`` into the target's base weight; written
    into a shared tensor it would change the embeddings too. The config's ``tie_word_embeddings``
    is set to False so that transformers neither re-ties nor drops the copy when saving. Under
    ZeRO-3 a partitioned weight cannot be copied in place: refused with the fix.
    """
    if not config.uses_svd_init:
        return
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for name, module in layers:
        base = module.get_base_layer()
        others = [n for n in names_of.get(id(base.weight), []) if not n.startswith(f"{name}.")]
        if not others:
            continue
        if hasattr(base.weight, "ds_id"):
            raise ValueError(
                f"Target {name!r} shares its weight with {others[0]!r} (tied embeddings), and under ZeRO-3 DuDe cannot "
                f"untie a partitioned weight. Leave it out of target_modules, or save the base once with "
                f"tie_word_embeddings=False (both matrices written) and train from that copy."
            )
        base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=base.weight.requires_grad)
        for model_config in _model_configs(model):
            model_config.tie_word_embeddings = False
        logger.warning(
            "Untied %s from %s (tie_word_embeddings=False now, %.1f MiB more): %s writes its residual into the "
            "adapted weight, which must not change the other one.",
            name, others[0], base.weight.numel() * base.weight.element_size() / 2**20, config.method,
        )


def _model_configs(model: nn.Module) -> list[Any]:
    """The transformers configs of `model` that say ``tie_word_embeddings=True`` (top and text)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    return [c for c in configs if getattr(c, "tie_word_embeddings", False)]


def held_buffer(module: LoraLayer, attr: str, adapter_name: str) -> Optional[torch.Tensor]:
    """The DuDe buffer `attr` (`INIT_A`, `INIT_B`, `FINGERPRINT`) of `adapter_name`, or None."""
    buffers = getattr(module, attr, None)
    return buffers[adapter_name] if buffers is not None and adapter_name in buffers else None


def residual_owner(module: LoraLayer) -> Optional[str]:
    """The adapter whose residual ``W0 - s B0 A0`` the layer's base weight holds (the one adapter
    with initial factors), or None when the base weight is the pretrained one."""
    buffers = getattr(module, INIT_A, None)
    return next(iter(buffers.keys()), None) if buffers is not None else None


def principal_part(module: LoraLayer, owner: str) -> torch.Tensor:
    """``s B0 A0`` of the layer's residual owner (``out x in``, float32): what its residual lacks
    from the pretrained weight."""
    A0, B0 = held_buffer(module, INIT_A, owner), held_buffer(module, INIT_B, owner)
    return module.scaling[owner] * (B0.float() @ A0.float())


def store_buffer(module: LoraLayer, attr: str, adapter_name: str, value: torch.Tensor) -> None:
    """Store a copy of `value` as the persistent DuDe buffer `attr` of `adapter_name`."""
    if not hasattr(module, attr):
        setattr(module, attr, BufferDict(persistent=True))
    getattr(module, attr)[adapter_name] = value.detach().clone()


def register_init_factors(module: LoraLayer, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Record the initial factors the layer's residual was built from (`INIT_A`, `INIT_B`)."""
    store_buffer(module, INIT_A, adapter_name, A)
    store_buffer(module, INIT_B, adapter_name, B)


def install_dude_variant_(model: PeftModel, adapter_name: str = "default") -> None:
    """Use `DuDeLinearVariant` (DuDe's fast forward) on every magnitude layer of `adapter_name`."""
    if not model.peft_config[adapter_name].has_magnitude:
        return
    modules = [module for _, module in dude_layers(model, adapter_name)]
    for module in modules:
        module.lora_variant[adapter_name] = DuDeLinearVariant()
        install_cache_invalidation(module)
    link_norm_peers_(modules, adapter_name)
