"""The bitsandbytes base (QDuDe): DuDe on a 4-bit (NF4/FP4) or 8-bit base, QPiSSA-style.

For each target layer the top-r SVD of the *full-precision* weight ``W0`` goes into A, B
(kept in float32), and only the residual ``W_res = W0 - s*B@A`` is quantized into the
bitsandbytes layer. The principal components, which carry most of the weight's energy and
its outliers, are never quantized, so ``deq(q(W_res)) + s*B@A`` is closer to ``W0`` than
plain ``deq(q(W0))`` (PiSSA, Meng et al. 2024, sec. 4.3). With ``DuDeConfig(quant_iters=T)``
A, B are re-fitted T times to what quantization lost (LoftQ / QPiSSA alternation).

How a model loads (memory): transformers loads and quantizes the checkpoint as usual, one
tensor at a time, so no full-precision copy of the model ever exists. Then, layer by layer,
the full-precision ``W0`` of each target is read back from the checkpoint's safetensors
(`dude_trl.checkpoint`), decomposed on the layer's device and its residual quantized in place
of ``q(W0)``. Peak memory beyond the quantized model is one target weight in float32 plus the
SVD workspace. Checkpoints without safetensors, pre-quantized checkpoints and already-quantized
model objects fall back to the dequantized weight ``deq(q(W0))`` as ``W0`` (with a logged note:
less accurate).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoConfig, BitsAndBytesConfig, PreTrainedModel

from ..checkpoint import HUB_KWARGS, CheckpointWeights, checkpoint_weights
from ..layers import INIT_A, held_buffer, principal_part, residual_owner
from .bnb_storage import (
    QuantSpec,
    bnb,
    dequantized_weight,
    is_bnb_layer,
    prepare_bnb_layers_,
    set_quantized_weight_,
    unpack_cpu_weight,
)
from .full import FullPrecisionBase, load_base_model

logger = logging.getLogger(__name__)

# Methods that fit their weights to calibration data: a residual cannot be re-quantized at load time.
_CALIBRATED_METHODS = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "aqlm": "AQLM",
    "vptq": "VPTQ",
    "spqr": "SpQR",
    "higgs": "HIGGS",
    "auto-round": "AutoRound",
    "quark": "Quark",
    "compressed-tensors": "compressed-tensors",
}
_FULL_PRECISION_HINT = (
    "load the full-precision checkpoint with quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
    "bnb_4bit_quant_type='nf4') (or load_in_8bit=True) instead"
)


# ----------------------------------------------------------------------------------------------------
# What DuDe can decompose
# ----------------------------------------------------------------------------------------------------


def _method_name(method: Any) -> str:
    return str(getattr(method, "value", method))


def _unsupported_method_error(method: Any) -> ValueError:
    name = _method_name(method)
    label = _CALIBRATED_METHODS.get(name.lower())
    if label is not None:
        reason = (
            f"{label} fits its quantized weights to a calibration set, so DuDe cannot re-quantize the residual "
            f"W0 - s*B@A at load time"
        )
    else:
        reason = f"quantization method {name!r} is not one DuDe can re-quantize a residual with"
    return ValueError(
        f"{reason}; DuDe supports bitsandbytes 4-bit (NF4/FP4) and 8-bit bases. To use DuDe, {_FULL_PRECISION_HINT}. "
        f"For plain LoRA on a {label or name} model, use peft.LoraConfig directly."
    )


def validate_quantization_config(quantization_config: Any) -> Any:
    """The `transformers.BitsAndBytesConfig` DuDe will load with (a dict is converted).

    Raises a `ValueError` naming the problem and the fix for other quantization schemes
    (GPTQ, AWQ, ...) and for bitsandbytes settings DuDe cannot decompose.
    """
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method", "bitsandbytes")
        if _method_name(method) != "bitsandbytes":
            raise _unsupported_method_error(method)
        quantization_config = BitsAndBytesConfig.from_dict(dict(quantization_config))
    if not isinstance(quantization_config, BitsAndBytesConfig):
        method = getattr(quantization_config, "quant_method", type(quantization_config).__name__)
        raise _unsupported_method_error(method)
    if not (quantization_config.load_in_4bit or quantization_config.load_in_8bit):
        raise ValueError(
            "The BitsAndBytesConfig sets neither load_in_4bit nor load_in_8bit, so nothing would be quantized; "
            "set load_in_4bit=True (NF4/FP4) or load_in_8bit=True, or pass quantization_config=None for a "
            "full-precision base."
        )
    if quantization_config.load_in_8bit and quantization_config.llm_int8_has_fp16_weight:
        raise ValueError(
            "llm_int8_has_fp16_weight=True keeps the 8-bit layers' weights in float16 and re-quantizes them on every "
            "forward, so there is no stored quantized residual for DuDe to build; set llm_int8_has_fp16_weight=False."
        )
    return quantization_config




def is_quantized_model(model: nn.Module) -> bool:
    """True when `model` (a transformers or PEFT model) holds quantized weights of any scheme."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(is_bnb_layer(m) for m in model.modules())


def base_quantization_record(model: nn.Module) -> Optional[dict[str, Any]]:
    """`QuantSpec.record` of the first bitsandbytes layer of `model` (None when it has none)."""
    for module in model.modules():
        if is_bnb_layer(module):
            return QuantSpec.from_layer(module).record
    return None


def bnb_config_from_record(record: dict[str, Any], compute_dtype: torch.dtype = torch.float32) -> Any:
    """The `BitsAndBytesConfig` that quantizes a base as `record` (`DuDeConfig.base_quantization`) says."""
    if record["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=record["quant_type"],
        bnb_4bit_use_double_quant=record["double_quant"],
        bnb_4bit_compute_dtype=compute_dtype,
    )


def check_quantized_model(model: nn.Module) -> None:
    """Raise a clear `ValueError` when `model` is quantized with a scheme DuDe cannot decompose."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(model, "quantization_method", None)
    if method is None and quantizer is not None:
        method = getattr(quantizer.quantization_config, "quant_method", None)
    if method is not None and _method_name(method) != "bitsandbytes":
        raise _unsupported_method_error(method)




# ----------------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------------


class LayerInit(NamedTuple):
    """What the initialisation of one quantized layer achieved (Frobenius norms)."""

    name: str
    error: float  # ||W0 - (deq(q(W_res)) + s*B@A)||
    plain_error: float  # ||W0 - deq(q(W0))||: plain quantization, what QLoRA starts from
    from_full_precision: bool  # False: W0 was the dequantized weight of an already-quantized layer


class BitsAndBytesBase(FullPrecisionBase):
    """A base with bitsandbytes layers: the residual is quantized with each layer's own settings.

    Targets the quantization skipped (e.g. `llm_int8_skip_modules`) are handled as full precision.

    Args:
        model: the quantized transformers model (or the `PeftModel` around it).
        checkpoint: the path or hub id it was loaded from; ``W0`` is read from its safetensors
            when it has them, else the dequantized weight stands in (logged: less accurate).
        checkpoint_kwargs: the `from_pretrained` kwargs it was loaded with (revision, ...).
    """

    def __init__(self, model: nn.Module, checkpoint: Optional[str] = None, checkpoint_kwargs: Optional[dict] = None):
        base_model = model.get_base_model() if isinstance(model, PeftModel) else model
        check_quantized_model(base_model)
        self.checkpoint = checkpoint
        self.quantization_record = base_quantization_record(base_model)
        self._names_in_base = {id(m): n for n, m in base_model.named_modules()}
        self._weights: Optional[CheckpointWeights] = checkpoint_weights(
            checkpoint, base_model, dict(checkpoint_kwargs or {})
        )
        self._reports: list[LayerInit] = []
        self._read_from_checkpoint: set[int] = set()  # ids of the layers whose W0 came from the checkpoint

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()

    def prepare(self, model: nn.Module) -> None:
        prepare_bnb_layers_(model)

    def original_weight(self, module: LoraLayer, adapter_name: str) -> Optional[torch.Tensor]:
        # A quantized residual has lost W0's low bits: W0 cannot be recovered from it.
        if is_bnb_layer(module.get_base_layer()) and held_buffer(module, INIT_A, adapter_name) is not None:
            return None
        return super().original_weight(module, adapter_name)

    def weight_to_decompose(self, module: LoraLayer, adapter_name: str) -> Optional[torch.Tensor]:
        base = module.get_base_layer()
        if not is_bnb_layer(base):
            return super().weight_to_decompose(module, adapter_name)
        if held_buffer(module, INIT_A, adapter_name) is not None:
            return None
        W0 = None
        if self._weights is not None:
            conv1d = getattr(getattr(base, "source_cls", None), "__name__", "") == "Conv1D"
            W0 = self._weights.get(self._names_in_base[id(module)], (base.out_features, base.in_features), conv1d)
        if W0 is None:
            W0 = dequantized_weight(base)
        else:
            self._read_from_checkpoint.add(id(module))
        return W0.to(device=base.weight.device, dtype=torch.float32)

    def write_residual(self, module: LoraLayer, residual: torch.Tensor) -> None:
        base = module.get_base_layer()
        if not is_bnb_layer(base):
            return super().write_residual(module, residual)
        set_quantized_weight_(base, residual)

    def residual_roundtrip(self, module: LoraLayer) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        base = module.get_base_layer()
        return QuantSpec.from_layer(base).roundtrip if is_bnb_layer(base) else None

    def keeps_factors_in_float32(self, module: LoraLayer) -> bool:
        # QLoRA setups often cast adapters to bf16; DuDe's A, B hold W0's principal components,
        # which must not be rounded.
        return is_bnb_layer(module.get_base_layer())

    def note_initialised(self, name: str, module: LoraLayer, W0: torch.Tensor, error: float) -> None:
        base = module.get_base_layer()
        if not is_bnb_layer(base):
            return
        plain_error = torch.linalg.matrix_norm(W0 - QuantSpec.from_layer(base).roundtrip(W0)).item()
        self._reports.append(
            LayerInit(name, error, plain_error, id(module) in self._read_from_checkpoint)
        )

    def log_summary(self) -> None:
        reports = self._reports
        if not reports:
            return
        dequantized = [r.name for r in reports if not r.from_full_precision]
        if dequantized:
            where = (
                f"no full-precision weights could be read from {self.checkpoint!r}" if self.checkpoint else "the model object"
            )
            logger.warning(
                "QDuDe decomposed %d of %d quantized layers from their dequantized weights (%s). Loading from the "
                "full-precision checkpoint is more accurate: get_dude_model(path_or_id, config, "
                "quantization_config=BitsAndBytesConfig(...)) with a safetensors checkpoint.",
                len(dequantized),
                len(reports),
                where,
            )
        ratio = sum(r.error / r.plain_error for r in reports if r.plain_error > 0) / len(reports)
        logger.info(
            "QDuDe init: ||W0 - (deq(q(W_res)) + s*B@A)||_F is %.1f%% below plain quantization on average over %d layers.",
            100 * (1 - ratio),
            len(reports),
        )

    def merge_and_unload(self, model: PeftModel) -> PreTrainedModel:
        return merge_and_dequantize(model)


# ----------------------------------------------------------------------------------------------------
# Loading a quantized base
# ----------------------------------------------------------------------------------------------------


class QuantizedLoad(NamedTuple):
    """A quantized base as loaded, and where its full-precision weights can be read from."""

    model: PreTrainedModel
    checkpoint: Optional[str]  # path or hub id to read W0 from (None: none)
    checkpoint_kwargs: dict
    tmp: Optional[tempfile.TemporaryDirectory]  # to clean up once the model is initialised


def load_quantized_base(
    model_or_path: Union[str, PreTrainedModel], quantization_config: Any, model_kwargs: dict
) -> QuantizedLoad:
    """Load (or reuse) a bitsandbytes base: a path is loaded quantized, an already-quantized model
    is kept as it is, a full-precision model object is reloaded quantized through a temporary save
    (whose safetensors then give W0)."""
    if quantization_config is not None:
        quantization_config = validate_quantization_config(quantization_config)
    if isinstance(model_or_path, str):
        if quantization_config is None:
            raise ValueError("Loading a path quantized needs a quantization_config.")
        _check_checkpoint_quantization(model_or_path, model_kwargs)
        model = load_base_model(model_or_path, quantization_config, **model_kwargs)
        return QuantizedLoad(model, model_or_path, model_kwargs, None)
    if model_kwargs:
        raise ValueError(f"model_kwargs {sorted(model_kwargs)} only apply when a path is given.")
    if is_quantized_model(model_or_path):
        check_quantized_model(model_or_path)
        if quantization_config is not None:
            logger.warning(
                "The model is already quantized; its own bitsandbytes settings are kept and quantization_config is "
                "ignored."
            )
        return QuantizedLoad(model_or_path, None, {}, None)
    if quantization_config is None:
        raise ValueError("Quantizing a full-precision model needs a quantization_config.")
    if not isinstance(model_or_path, PreTrainedModel):
        raise ValueError(
            f"Quantizing a {type(model_or_path).__name__} needs a transformers PreTrainedModel (saved and reloaded "
            f"with the quantization_config); pass its path or hub id instead."
        )
    # A full-precision model object: reload it quantized through transformers (the same quantization as a
    # path gets), with the in-memory weights as the full-precision source.
    tmp = tempfile.TemporaryDirectory(prefix="qdude-")
    model_or_path.save_pretrained(tmp.name, safe_serialization=True)
    dtype = next((p.dtype for p in model_or_path.parameters() if p.is_floating_point()), torch.float32)
    device_map = {"": next(model_or_path.parameters()).device}
    model = load_base_model(tmp.name, quantization_config, dtype=dtype, device_map=device_map)
    return QuantizedLoad(model, tmp.name, {}, tmp)


def _check_checkpoint_quantization(path: str, model_kwargs: dict) -> None:
    """Refuse checkpoints pre-quantized with a scheme DuDe cannot decompose, before loading them."""
    kwargs = {k: v for k, v in model_kwargs.items() if k in HUB_KWARGS + ("trust_remote_code",)}
    try:
        model_config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        return  # from_pretrained will report what is wrong with the path
    stored = getattr(model_config, "quantization_config", None)
    if stored is None:
        return
    method = stored.get("quant_method") if isinstance(stored, dict) else getattr(stored, "quant_method", None)
    if method is not None and _method_name(method) != "bitsandbytes":
        raise _unsupported_method_error(method)


# ----------------------------------------------------------------------------------------------------
# Back to full precision
# ----------------------------------------------------------------------------------------------------


def _full_precision_linear(layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    bias = getattr(layer, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return linear


def merge_and_dequantize(model: PeftModel, dtype: Optional[torch.dtype] = None) -> PreTrainedModel:
    """Merge the active adapters into a full-precision copy of the base and drop quantization.

    PEFT's `merge_and_unload` on a bitsandbytes base re-quantizes the merged weight (losing
    what the adapter learnt below the quantization step). This instead returns a plain
    transformers model whose adapted layers hold ``merge(deq(W_res), A, B, m)`` and whose other
    quantized layers hold ``deq(W)``, in `dtype` (default: the model's load dtype). Works one
    layer at a time, in place: `model` is consumed. The result is full precision and needs
    that much memory.
    """
    base_model = model.get_base_model()
    if dtype is None:
        dtype = getattr(base_model.config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    _unpack_all(base_model)
    for name, module in list(base_model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not is_bnb_layer(base):
            continue
        weight = dequantized_weight(base)
        in_weight = list(module.merged_adapters) if module.merged else []
        if not module.merged:
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                if adapter in module.lora_variant:
                    weight = module.lora_variant[adapter].merge_safe(module, adapter, weight)
                else:
                    weight = weight + module.get_delta_weight(adapter).float()
                in_weight.append(adapter)
        owner = residual_owner(module)
        if owner is not None and owner not in in_weight:  # another adapter merged onto the pretrained weight
            weight = weight + principal_part(module, owner)
        base_model.set_submodule(name, _full_precision_linear(base, weight.float(), dtype))
    merged = model.merge_and_unload()  # the remaining PEFT wrappers (modules_to_save, ...), if any
    for name, module in list(merged.named_modules()):
        if is_bnb_layer(module):
            merged.set_submodule(name, _full_precision_linear(module, dequantized_weight(module), dtype))
    quantizer = getattr(merged, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(merged)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(merged, attr):
            delattr(merged, attr)
    merged.is_quantized = False
    return merged


def _unpack_all(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, bnb().nn.Linear4bit):
            unpack_cpu_weight(module)

