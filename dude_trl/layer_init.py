"""The SVD initialisation of one DuDe layer, on any base backend.

For a freshly injected PEFT LoRA/DoRA layer:

1. `decompose_layer`: the `method` split of the top-r SVD of ``W0``, re-fitted to what the base
   loses when it stores the residual (a quantized base; `svd.fit_factors`);
2. `write_init_factors`: A, B into the adapter, the residual ``W0 - s B A`` into the base (copied
   or quantized by the backend), the initial factors and the fingerprint of ``W0`` into the
   layer's DuDe buffers;
3. `reset_magnitude`: the magnitude becomes the row norm of ``W_res + s B A`` as stored, so the
   output at init is unchanged.

`dude_trl.distributed` runs these over many layers, shared between processes.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn

from .bases.full import FullPrecisionBase, stored_weight
from .config import DuDeConfig
from .fingerprint import base_fingerprint, store_fingerprint
from .layers import FINGERPRINT, dude_layers, held_buffer, register_init_factors
from .pretrained import install_pretrained_view_
from .svd import FittedFactors, fit_factors, layer_seed


def init_params(module: LoraLayer, adapter_name: str) -> list[nn.Parameter]:
    """The parameters the SVD initialisation reads and writes (to gather under ZeRO-3)."""
    return [module.get_base_layer().weight, module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight]


def weight_to_decompose(module: LoraLayer, name: str, adapter_name: str, base: FullPrecisionBase) -> torch.Tensor:
    """``W0`` of a layer about to be initialised (`init_params` gathered under ZeRO-3)."""
    W0 = base.weight_to_decompose(module, adapter_name)
    if W0 is None:
        raise RuntimeError(f"Layer {name!r} already holds a DuDe residual for adapter {adapter_name!r}.")
    return W0


def decompose_layer(
    module: LoraLayer, name: str, adapter_name: str, config: DuDeConfig, base: FullPrecisionBase, W0: torch.Tensor
) -> FittedFactors:
    """Float32 A, B for the layer: the `config.method` split of the top-r SVD of `W0`, refined
    `config.quant_iters` times when the base stores the residual lossily. An exact base is
    decomposed on the GPU when there is one and `W0` is on the CPU."""
    roundtrip = base.residual_roundtrip(module)
    on_cpu_with_gpu = W0.device.type == "cpu" and torch.cuda.is_available()
    svd_device = torch.device("cuda") if roundtrip is None and on_cpu_with_gpu else W0.device
    factors = fit_factors(
        W0.to(svd_device),
        module.r[adapter_name],
        module.scaling[adapter_name],
        config.method,
        roundtrip,
        quant_iters=config.quant_iters,
        svd_niter=config.svd_niter,
        svd_oversample=config.svd_oversample,
        seed=layer_seed(config.svd_seed, name),
    )
    return factors._replace(A=factors.A.to(W0.device), B=factors.B.to(W0.device))


def _store_factor(param: nn.Parameter, value: torch.Tensor, keep_float32: bool) -> None:
    if keep_float32 and param.dtype in (torch.float16, torch.bfloat16):
        param.data = value.to(param.device).float()
    else:
        param.data.copy_(value.to(param.dtype))


def write_init_factors(
    module: LoraLayer, adapter_name: str, A: torch.Tensor, B: torch.Tensor, W0: torch.Tensor, base: FullPrecisionBase
) -> None:
    """Store A, B, the residual ``W0 - s B A`` (through `base`), the init buffers and the
    fingerprint of `W0`. `init_params` must be readable and writable (gathered under ZeRO-3)."""
    # First: `W0` may be the very tensor the residual overwrites.
    store_fingerprint(module, adapter_name, base_fingerprint(W0))
    A_param, B_param = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
    keep_float32 = base.keeps_factors_in_float32(module)
    _store_factor(A_param, A, keep_float32)
    _store_factor(B_param, B, keep_float32)
    # Subtract what A, B hold after the cast, so W_res + s*B@A reproduces W0 as closely as the dtype allows.
    residual = W0 - module.scaling[adapter_name] * (B_param.float() @ A_param.float()).to(W0.device)
    base.write_residual(module, residual)
    register_init_factors(module, adapter_name, A_param, B_param)
    install_pretrained_view_(module)


def reset_magnitude(module: LoraLayer, adapter_name: str) -> None:
    """Magnitude := row norm of ``W_res + s B A`` as stored, so the output at init is unchanged."""
    magnitude = module.lora_magnitude_vector[adapter_name].weight
    A_param, B_param = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
    base = module.get_base_layer()
    with gather_params_ctx([base.weight, A_param, B_param, magnitude], modifier_rank=0):
        merged = stored_weight(module) + module.scaling[adapter_name] * (B_param.float() @ A_param.float())
        magnitude.data.copy_(torch.linalg.vector_norm(merged, dim=1).to(magnitude.dtype))


def record_base_fingerprints_(model: nn.Module, adapter_name: str, base: FullPrecisionBase) -> None:
    """Fingerprint the original base of every layer of `adapter_name` that has no fingerprint yet
    (the layers the SVD initialisation did not touch: ``lora``/``dora``). Layers whose ``W0``
    cannot be recovered (a quantized residual) are skipped."""
    for _, module in dude_layers(model, adapter_name):
        if held_buffer(module, FINGERPRINT, adapter_name) is not None:
            continue
        with gather_params_ctx([module.get_base_layer().weight], modifier_rank=None):
            W0 = base.original_weight(module, adapter_name)
            if W0 is not None:
                store_fingerprint(module, adapter_name, base_fingerprint(W0))
