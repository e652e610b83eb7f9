"""How bitsandbytes stores a weight, and how to store another matrix exactly the same way.

`QuantSpec` reads a `Linear4bit` / `Linear8bitLt` layer's settings and quantizes, dequantizes
or round-trips any ``out x in`` matrix as that layer would; `set_quantized_weight_` replaces a
layer's weight by the quantization of another matrix (the DuDe residual). bitsandbytes is an
optional dependency: it is imported only once a bitsandbytes layer is met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from ..norms import is_quantized_layer


def bnb():
    """The `bitsandbytes` module (an optional dependency: a clear error when it is missing)."""
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency of the quantized path
        raise ImportError("QDuDe needs bitsandbytes: `pip install bitsandbytes`.") from err
    return bitsandbytes


def is_bnb_layer(module: nn.Module) -> bool:
    """True for a bitsandbytes `Linear4bit` / `Linear8bitLt` layer."""
    if not is_quantized_layer(module):
        return False
    return isinstance(module, (bnb().nn.Linear4bit, bnb().nn.Linear8bitLt))


class QuantizedWeight(NamedTuple):
    """bitsandbytes storage of one weight: packed 4-bit data + `QuantState`, or int8 rows + row scales."""

    data: torch.Tensor
    state: Any


@dataclass(frozen=True)
class QuantSpec:
    """How a bitsandbytes layer stores its weight, enough to quantize another matrix identically.

    Attributes:
        bits: 4 (blockwise NF4/FP4) or 8 (LLM.int8() row-wise absmax).
        quant_type: ``"nf4"`` or ``"fp4"`` (4-bit only).
        blocksize: elements per absmax block (4-bit only; bitsandbytes' default is 64).
        double_quant: whether the block absmax values are themselves quantized (4-bit only).
        quant_storage: dtype the packed 4-bit data is stored in.
        dtype: dtype the weight is cast to before quantization and that dequantization returns
            (4-bit: the model's load dtype; 8-bit: float16, as bitsandbytes quantizes from it).
    """

    bits: int
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    quant_storage: torch.dtype = torch.uint8
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_layer(cls, layer: nn.Module) -> "QuantSpec":
        """The settings of an already-quantized bitsandbytes layer."""
        if isinstance(layer, bnb().nn.Linear4bit):
            unpack_cpu_weight(layer)
            weight = layer.weight
            state = weight.quant_state
            if state is None:
                raise ValueError(f"{type(layer).__name__} holds no quantized weight yet (move it to a device first).")
            return cls(
                bits=4,
                quant_type=state.quant_type,
                blocksize=state.blocksize,
                double_quant=bool(state.nested),
                quant_storage=weight.quant_storage,
                dtype=state.dtype,
            )
        if isinstance(layer, bnb().nn.Linear8bitLt):
            return cls(bits=8, dtype=torch.float16)
        raise TypeError(f"Expected a bitsandbytes Linear4bit or Linear8bitLt layer, got {type(layer).__name__}.")

    @classmethod
    def from_config(cls, config: BitsAndBytesConfig, dtype: torch.dtype = torch.float32) -> "QuantSpec":
        """The settings transformers uses for a `BitsAndBytesConfig` when loading in `dtype`."""
        # `bases.bnb.validate_quantization_config` has checked the config.
        if config.load_in_8bit:
            return cls(bits=8, dtype=torch.float16)
        return cls(
            bits=4,
            quant_type=config.bnb_4bit_quant_type,
            double_quant=bool(config.bnb_4bit_use_double_quant),
            quant_storage=config.bnb_4bit_quant_storage,
            dtype=dtype,
        )

    @property
    def record(self) -> dict[str, Any]:
        """What a saved adapter keeps of these settings (`DuDeConfig.base_quantization`)."""
        if self.bits == 8:
            return {"bits": 8, "quant_type": "int8", "double_quant": False}
        return {"bits": 4, "quant_type": self.quant_type, "double_quant": self.double_quant}

    @property
    def label(self) -> str:
        if self.bits == 8:
            return "int8"
        return self.quant_type.upper() + (" + double quant" if self.double_quant else "")

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Quantize an ``out x in`` matrix on its device."""
        F = bnb().functional
        weight = weight.detach().to(self.dtype).contiguous()
        if self.bits == 8:
            CB, SCB, _ = F.int8_vectorwise_quant(weight)
            return QuantizedWeight(CB, SCB)
        data, state = F.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        return QuantizedWeight(data, state)

    def dequantize(self, quantized: QuantizedWeight) -> torch.Tensor:
        """The float32 matrix a quantized weight stands for."""
        F = bnb().functional
        if self.bits == 8:
            return F.int8_vectorwise_dequant(quantized.data, quantized.state).float()
        return F.dequantize_4bit(quantized.data, quantized.state).float()

    def roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """``deq(q(weight))`` in float32."""
        return self.dequantize(self.quantize(weight))


def unpack_cpu_weight(layer: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit weight (a different memory layout
    with bfloat16 block scales), which `dequantize_4bit` cannot read."""
    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
        layer.quant_state = layer.weight.quant_state


def prepare_bnb_layers_(model: nn.Module) -> None:
    """Make every bitsandbytes layer of `model` compute exactly with ``deq(W)`` on CPU.

    - 4-bit: on CPUs with AVX512-BF16, `Linear4bit` repacks its weight on the first eval-mode
      forward and rounds the block scales to bfloat16, so the layer no longer computes
      ``x @ deq(W)^T`` (DuDe's magnitude and norm are computed from ``deq(W)``); the repacking
      also fails for ``in_features < blocksize``. It is switched off.
    - 8-bit: PEFT's `dequantize_module_weight` re-creates a CPU `Int8Params` without its row
      scales once a forward has moved them into the layer's matmul state, and the next forward
      then fails. A pre-forward hook hands the scales back.

    Neither touches GPU behaviour.
    """
    for module in model.modules():
        if isinstance(module, bnb().nn.Linear4bit):
            unpack_cpu_weight(module)
            module.support_avx512bf16_for_cpu = False
        elif isinstance(module, bnb().nn.Linear8bitLt) and not getattr(module, "_dude_scale_hook", False):
            module.register_forward_pre_hook(_restore_int8_scales)
            module._dude_scale_hook = True


def _restore_int8_scales(module: nn.Module, _args: Any) -> None:
    weight = module.weight
    if getattr(weight, "CB", None) is not None and getattr(weight, "SCB", None) is None:
        if module.state.SCB is not None:
            weight.SCB = module.state.SCB


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """``deq(W)`` of a bitsandbytes layer, ``out x in``, float32."""
    spec = QuantSpec.from_layer(layer)
    if spec.bits == 4:
        return spec.dequantize(QuantizedWeight(layer.weight.data, layer.weight.quant_state))
    scb = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
    return spec.dequantize(QuantizedWeight(layer.weight.data, scb))


def set_quantized_weight_(layer: nn.Module, weight: torch.Tensor, spec: Optional[QuantSpec] = None) -> None:
    """Quantize `weight` (``out x in``) into `layer` with the layer's own settings, replacing its weight."""
    spec = spec or QuantSpec.from_layer(layer)
    quantized = spec.quantize(weight.to(layer.weight.device))
    if spec.bits == 4:
        layer.weight = bnb().nn.Params4bit(
            quantized.data,
            requires_grad=False,
            quant_state=quantized.state,
            blocksize=spec.blocksize,
            compress_statistics=spec.double_quant,
            quant_type=spec.quant_type,
            quant_storage=spec.quant_storage,
            module=layer,
            bnb_quantized=True,
        )
        layer.quant_state = quantized.state
    else:
        layer.weight = bnb().nn.Int8Params(
            quantized.data, requires_grad=False, has_fp16_weights=False, CB=quantized.data, SCB=quantized.state
        )
        layer.state.reset_grads()  # the next forward takes CB/SCB from the new weight


