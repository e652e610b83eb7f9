"""What a QDuDe model claims at init, computed in float: shared by the CPU and the CUDA tests."""

from __future__ import annotations

import copy

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from dude_trl.bases.bnb_storage import QuantSpec, dequantized_weight, is_bnb_layer


def lora_layers(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def init_errors(peft_model, float_model) -> list[tuple[float, float]]:
    """Per target: (||W0 - (deq(W_res) + s*B@A)||_F, ||W0 - deq(q(W0))||_F)."""
    out = []
    for name, layer in lora_layers(peft_model).items():
        base = layer.get_base_layer()
        W0 = float_model.get_submodule(name).weight.detach().to(layer.lora_A["default"].weight.device)
        effective = dequantized_weight(base) + layer.scaling["default"] * (
            layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        )
        plain = QuantSpec.from_layer(base).roundtrip(W0)
        out.append(((W0 - effective).norm().item(), (W0 - plain).norm().item()))
    return out


def reference_model(float_model: nn.Module, peft_model) -> nn.Module:
    """A float copy, on the quantized model's device, computing what the quantized model claims
    at init: every quantized Linear holds deq(W), every adapted one deq(W_res) + s*B@A."""
    device = next(peft_model.parameters()).device
    ref = copy.deepcopy(float_model).to(device)
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if name.endswith(".base_layer"):
                continue
            if isinstance(module, LoraLayer):
                weight = dequantized_weight(module.get_base_layer())
                for adapter in module.active_adapters:
                    delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight
                    weight = weight + module.scaling[adapter] * delta
            elif is_bnb_layer(module):
                weight = dequantized_weight(module)
            else:
                continue
            ref.get_submodule(name).weight.copy_(weight)
    return ref
