"""The full-precision base: frozen weights that are plain float32/bf16/fp16 tensors (possibly
partitioned by ZeRO-3), and the interface every base backend implements.

What varies with the kind of base is small: how the original weight ``W0`` is read, how the
residual ``W0 - s B0 A0`` is written back (copied here, quantized by `bases.bnb`), what storing
the residual loses (nothing here), how an adapted model is merged, and what a saved adapter
records about the base. `FullPrecisionBase` is that interface and its full-precision answer;
`dude_trl.bases.base_for` picks the backend once per model.

Every method that reads or writes a weight expects it gathered (`gather_params_ctx`) under ZeRO-3.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..layers import INIT_A, held_buffer, principal_part


def load_base_model(
    model_or_path: Union[str, PreTrainedModel], quantization_config: Any = None, **model_kwargs: Any
) -> PreTrainedModel:
    """A causal LM from a hub id or local dir (or the model itself). Loads in float32 unless
    `dtype` is given, as TRL does."""
    if not isinstance(model_or_path, str):
        if model_kwargs:
            raise ValueError(f"model_kwargs {sorted(model_kwargs)} only apply when a path is given.")
        return model_or_path
    model_kwargs.setdefault("dtype", torch.float32)
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    return AutoModelForCausalLM.from_pretrained(model_or_path, **model_kwargs)


def stored_weight(module: LoraLayer) -> torch.Tensor:
    """The layer's frozen base weight as it computes with it: ``out x in``, float32, dequantized
    if needed (PEFT's dequantization, the one the DuDe forward's norm uses)."""
    weight = dequantize_module_weight(module.get_base_layer()).float()
    return weight.T if module.fan_in_fan_out else weight


def write_weight(module: LoraLayer, weight: torch.Tensor) -> None:
    """Copy `weight` (``out x in``) into the layer's full-precision base weight, in its dtype and layout."""
    base = module.get_base_layer()
    weight = weight.T if module.fan_in_fan_out else weight
    base.weight.data.copy_(weight.to(base.weight.dtype))


class FullPrecisionBase:
    """A base whose frozen weights are stored exactly; the interface of every base backend.

    Use it as a context manager: a backend may hold files open while a model is initialised.
    """

    #: What `DuDeConfig.base_quantization` records for this base (None: full precision).
    quantization_record: Optional[dict[str, Any]] = None

    def __enter__(self) -> "FullPrecisionBase":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release what the backend holds open (nothing here)."""

    def prepare(self, model: nn.Module) -> None:
        """Make `model`'s base layers ready to be decomposed and trained (nothing to do here)."""

    def original_weight(self, module: LoraLayer, adapter_name: str) -> Optional[torch.Tensor]:
        """``W0`` (``out x in``, float32) as the layer's computation stands for it: the stored
        weight, plus the layer's own ``s B0 A0`` when it holds a DuDe residual (exact up to one
        rounding of the base dtype); None where a backend cannot recover it."""
        weight = stored_weight(module)
        if held_buffer(module, INIT_A, adapter_name) is not None:
            weight = weight + principal_part(module, adapter_name).to(weight.device)
        return weight

    def weight_to_decompose(self, module: LoraLayer, adapter_name: str) -> Optional[torch.Tensor]:
        """The full-precision ``W0`` to take the SVD of and build the residual from, or None when
        it cannot be had (see `original_weight`)."""
        return self.original_weight(module, adapter_name)

    def write_residual(self, module: LoraLayer, residual: torch.Tensor) -> None:
        """Store `residual` (``out x in``) as the layer's frozen base weight, in its dtype and layout."""
        write_weight(module, residual)

    def residual_roundtrip(self, module: LoraLayer) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """What storing a residual in this layer does to it, when that loses something (None: exact)."""
        return None

    def keeps_factors_in_float32(self, module: LoraLayer) -> bool:
        """Whether A, B stay float32 even when the adapter parameters are half precision."""
        return False

    def note_initialised(self, name: str, module: LoraLayer, W0: torch.Tensor, error: float) -> None:
        """Hear that layer `name` was decomposed from `W0` with residual-store error `error` (for a
        backend's summary; nothing here)."""

    def log_summary(self) -> None:
        """Log what the initialisation achieved on this base (nothing to say here)."""

    def merge_and_unload(self, model: PeftModel) -> PreTrainedModel:
        """The plain transformers model computing what `model` computes (PEFT's merge)."""
        return model.merge_and_unload()
