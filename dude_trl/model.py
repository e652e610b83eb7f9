"""Build a DuDe `PeftModel`: PEFT injects the LoRA/DoRA layers, this module initialises them.

`get_peft_model` with a `DuDeConfig` (a `LoraConfig` whose `use_dora` follows `method`)
creates PEFT's own layers with Kaiming/zero factors and, for the magnitude methods, the
magnitude ``||W0||_row``. `initialize_dude_` then, layer by layer:

1. takes the top-r SVD of ``W0`` (SVD methods) and writes the split factors into A, B;
2. replaces the frozen base weight by the residual ``W0 - s B A``;
3. records the initial A, B as buffers (`lora_dude_init_A/B`), saved with the adapter, so
   the exact residual can be rebuilt from the original base whatever the RNG state;
4. sets the magnitude to the row norm of ``W_res + s B A`` as stored;
5. installs `DuDeLinearVariant` (the fast forward) on the magnitude methods.

The same function runs after `trl.SFTTrainer` applied PEFT itself, which keeps all of TRL's
PEFT handling (ZeRO-3 adapter dtype, input grads for checkpointing, k-bit preparation).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch
from peft import PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import NoMatchingPeftModuleError
from peft.utils.integrations import dequantize_module_weight, gather_params_ctx
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .config import DuDeConfig
from .layer import DuDeLinearVariant, install_cache_invalidation, invalidate_norm_caches
from .svd import layer_seed, split_factors, top_r_svd

logger = logging.getLogger(__name__)

INIT_A = "lora_dude_init_A"
INIT_B = "lora_dude_init_B"


def _supported_base(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, (nn.Linear, Conv1D))


def _linear_suffixes(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _supported_base(m) and name})


def inject_adapter(model: nn.Module, config: DuDeConfig, adapter_name: str = "default") -> PeftModel:
    """`peft.get_peft_model`, with PEFT's "target modules not found" error restated to list the
    Linear layers `model` has. PEFT expands ``"all-linear"`` and per-architecture defaults."""
    try:
        return get_peft_model(model, config, adapter_name=adapter_name)
    except NoMatchingPeftModuleError as err:
        raise ValueError(
            f"target_modules={config.target_modules!r} match no module of {type(model).__name__}. "
            f"Linear layers it has: {', '.join(_linear_suffixes(model))}."
        ) from err


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear/Conv1D, also for a ZeRO-3 partitioned or packed quantized weight."""
    if isinstance(module, Conv1D):
        return module.nf, getattr(module.weight, "ds_shape", module.weight.shape)[0]
    return module.out_features, module.in_features


def _check_rank(name: str, module: nn.Module, r: int) -> None:
    out_features, in_features = _weight_shape(module)
    if r > min(out_features, in_features):
        raise ValueError(
            f"r={r} exceeds min(out, in)={min(out_features, in_features)} for {name!r} "
            f"({out_features}x{in_features}); lower `r` or set a smaller `rank_pattern` entry for it."
        )


def _dude_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
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
        if not _supported_base(base):
            raise ValueError(
                f"DuDe adapts Linear and Conv1D layers, but target {name!r} is a {type(base).__name__}; "
                f"remove it from target_modules."
            )
        _check_rank(name, base, module.r[adapter_name])
        if config.uses_svd_init and hasattr(module, INIT_A) and adapter_name in getattr(module, INIT_A):
            raise RuntimeError(f"Layer {name!r} already holds a DuDe initialisation for adapter {adapter_name!r}.")


def _frozen_weight(module: LoraLayer) -> torch.Tensor:
    """The base weight in ``out x in`` layout, dequantized if needed (float32)."""
    weight = dequantize_module_weight(module.get_base_layer()).float()
    return weight.T if module.fan_in_fan_out else weight


def _write_frozen_weight(module: LoraLayer, weight: torch.Tensor) -> None:
    base = module.get_base_layer()
    weight = weight.T if module.fan_in_fan_out else weight
    base.weight.data.copy_(weight.to(base.weight.dtype))


def _register_init_factors(module: LoraLayer, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    for attr, value in ((INIT_A, A), (INIT_B, B)):
        if not hasattr(module, attr):
            setattr(module, attr, BufferDict(persistent=True))
        getattr(module, attr)[adapter_name] = value.detach().clone()


def init_params(module: LoraLayer, adapter_name: str) -> list[nn.Parameter]:
    """The parameters the SVD initialisation reads and writes (to gather under ZeRO-3)."""
    return [module.get_base_layer().weight, module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight]


def decompose_layer(module: LoraLayer, name: str, adapter_name: str, config: DuDeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(A, B)``: the `config.method` split of the top-r SVD of the layer's base weight,
    computed on the GPU when there is one. The weight must be readable (gathered under ZeRO-3)."""
    W0 = _frozen_weight(module)
    # A model still on the CPU decomposes on the GPU when there is one.
    svd_device = torch.device("cuda") if W0.device.type == "cpu" and torch.cuda.is_available() else W0.device
    svd = top_r_svd(
        W0.to(svd_device), module.r[adapter_name], config.svd_niter,
        oversample=config.svd_oversample, seed=layer_seed(config.svd_seed, name),
    )
    A, B = split_factors(svd, module.scaling[adapter_name], config.method)
    return A.to(W0.device), B.to(W0.device)


def write_init_factors(module: LoraLayer, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Store A, B, the residual ``W0 - s B A`` in the base layer and the init buffers.
    `init_params` must be readable and writable (gathered under ZeRO-3)."""
    A_param, B_param = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
    W0 = _frozen_weight(module)
    A_param.data.copy_(A.to(A_param.dtype))
    B_param.data.copy_(B.to(B_param.dtype))
    # Subtract what A, B hold after the cast, so W_res + s*B@A reproduces W0 as closely as the dtype allows.
    residual = W0 - module.scaling[adapter_name] * (B_param.float() @ A_param.float()).to(W0.device)
    _write_frozen_weight(module, residual)
    _register_init_factors(module, adapter_name, A_param, B_param)


def svd_init_layer(module: LoraLayer, name: str, adapter_name: str, config: DuDeConfig) -> None:
    """Set A, B to the `config.method` split of the top-r SVD of the base weight and the base
    to the residual. Runs on the weight's device in float32 and casts back."""
    with gather_params_ctx(init_params(module, adapter_name), modifier_rank=0):
        write_init_factors(module, adapter_name, *decompose_layer(module, name, adapter_name, config))


def reset_magnitude(module: LoraLayer, adapter_name: str) -> None:
    """Magnitude := row norm of ``W_res + s B A`` as stored, so the output at init is unchanged."""
    magnitude = module.lora_magnitude_vector[adapter_name].weight
    A_param, B_param = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
    base = module.get_base_layer()
    with gather_params_ctx([base.weight, A_param, B_param, magnitude], modifier_rank=0):
        merged = _frozen_weight(module) + module.scaling[adapter_name] * (B_param.float() @ A_param.float())
        magnitude.data.copy_(torch.linalg.vector_norm(merged, dim=1).to(magnitude.dtype))


def install_dude_variant_(model: PeftModel, adapter_name: str = "default") -> None:
    """Use `DuDeLinearVariant` (DuDe's fast forward) on every magnitude layer of `adapter_name`."""
    if not model.peft_config[adapter_name].has_magnitude:
        return
    for _, module in _dude_layers(model, adapter_name):
        module.lora_variant[adapter_name] = DuDeLinearVariant()
        install_cache_invalidation(module)


def initialize_dude_(model: nn.Module, adapter_name: str = "default", progress: bool = True) -> nn.Module:
    """Turn the freshly injected PEFT LoRA/DoRA layers of `model` into DuDe layers, in place.

    `model` is a `PeftModel` whose `peft_config[adapter_name]` is a `DuDeConfig`. Idempotent
    for the variant swap; the SVD initialisation must run exactly once per adapter.

    In a distributed run (DDP, ZeRO-2, ZeRO-3) every process must call this on the same
    model: the SVDs are shared between the processes and the results broadcast, so all of
    them end with identical values (`dude_trl.distributed`). `progress` shows a bar on rank 0.
    """
    config = model.peft_config[adapter_name]
    if not isinstance(config, DuDeConfig):
        raise TypeError(f"initialize_dude_ needs a DuDeConfig, got {type(config).__name__}.")
    from .quantized import initialize_quantized_dude_, is_quantized_model

    if is_quantized_model(model):
        # bitsandbytes bases store packed weights: the residual is quantized, not copied in.
        initialize_quantized_dude_(model, adapter_name, progress)
        return model
    layers = _dude_layers(model, adapter_name)
    check_dude_layers(layers, adapter_name, config)

    if config.uses_svd_init:
        # Imported here: `distributed` builds on this module's per-layer helpers.
        from .distributed import svd_init_layers_

        # Shares the SVDs between the processes of a distributed run (serial otherwise).
        svd_init_layers_(layers, adapter_name, config, progress=progress)
    install_dude_variant_(model, adapter_name)
    # Imported here: `io` builds on this module's helpers. A few numbers per layer, saved with
    # the adapter, let a reload detect a wrong base model.
    from .io import record_base_fingerprints_

    record_base_fingerprints_(model, adapter_name)
    invalidate_norm_caches(model)
    return model


def load_base_model(
    model_or_path: Union[str, PreTrainedModel], quantization_config: Any = None, **model_kwargs: Any
) -> PreTrainedModel:
    """A causal LM from a hub id or local dir (or the model itself). Loads in float32 unless
    `dtype` is given, as TRL does."""
    if not isinstance(model_or_path, str):
        if model_kwargs:
            raise ValueError(f"model_kwargs {sorted(model_kwargs)} only apply when a path is given.")
        return model_or_path
    from transformers import AutoModelForCausalLM

    model_kwargs.setdefault("dtype", torch.float32)
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    return AutoModelForCausalLM.from_pretrained(model_or_path, **model_kwargs)


def get_dude_model(
    model_or_path: Union[str, PreTrainedModel],
    config: Union[DuDeConfig, str, os.PathLike],
    quantization_config: Optional[Any] = None,
    *,
    adapter_name: str = "default",
    progress: bool = True,
    is_trainable: bool = False,
    **model_kwargs: Any,
) -> PeftModel:
    """A `peft.PeftModel` with a DuDe (or baseline) adapter, initialised per `config.method`.

    Args:
        model_or_path: a transformers model, or a hub id / local directory to load one from.
        config: the adapter configuration, or the directory of a saved DuDe adapter to reload onto
            the original base (residual rebuilt exactly from its initial factors, see
            `dude_trl.io.load_dude_model`).
        quantization_config: a `transformers.BitsAndBytesConfig` for a 4-bit/8-bit base.
        adapter_name: PEFT adapter name.
        progress: show a progress bar over the layers being decomposed.
        is_trainable: for a saved adapter only: keep it trainable (frozen by default, as in PEFT).
        **model_kwargs: passed to `from_pretrained` when a path is given (e.g. ``dtype``).
    """
    if isinstance(config, (str, os.PathLike)):
        from .io import load_dude_model

        return load_dude_model(
            model_or_path, config, adapter_name=adapter_name, is_trainable=is_trainable,
            quantization_config=quantization_config, progress=progress, **model_kwargs,
        )
    if not isinstance(config, DuDeConfig):
        raise TypeError(f"get_dude_model needs a DuDeConfig, got {type(config).__name__}; wrap your LoraConfig fields.")
    from .quantized import get_quantized_dude_model, is_quantized_model

    if quantization_config is not None or (not isinstance(model_or_path, str) and is_quantized_model(model_or_path)):
        return get_quantized_dude_model(
            model_or_path, config, quantization_config, adapter_name=adapter_name, progress=progress, **model_kwargs
        )
    model = load_base_model(model_or_path, **model_kwargs)
    return initialize_dude_(inject_adapter(model, config, adapter_name), adapter_name, progress=progress)
