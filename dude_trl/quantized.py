"""QDuDe: DuDe on a bitsandbytes 4-bit (NF4/FP4) or 8-bit base, QPiSSA-style.

For each target layer the top-r SVD of the *full-precision* weight ``W0`` goes into A, B
(kept in float32), and only the residual ``W_res = W0 - s*B@A`` is quantized into the
bitsandbytes layer. The principal components, which carry most of the weight's energy and
its outliers, are never quantized, so ``deq(q(W_res)) + s*B@A`` is closer to ``W0`` than
plain ``deq(q(W0))`` (PiSSA, Meng et al. 2024, sec. 4.3). With ``DuDeConfig(quant_iters=T)``
A, B are re-fitted T times to what quantization lost (LoftQ / QPiSSA alternation).

How a model loads (memory): transformers loads and quantizes the checkpoint as usual, one
tensor at a time, so no full-precision copy of the model ever exists. Then, layer by layer,
the full-precision ``W0`` of each target is read back from the checkpoint's safetensors
(memory-mapped, one tensor at a time), decomposed on the layer's device and its residual
quantized in place of ``q(W0)``. Peak memory beyond the quantized model is one target weight
in float32 plus the SVD workspace. Checkpoints without safetensors, pre-quantized
checkpoints and already-quantized model objects fall back to the dequantized weight
``deq(q(W0))`` as ``W0`` (with a logged note: less accurate).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .config import DuDeConfig
from .layer import invalidate_norm_caches
from .model import (
    _dude_layers,
    _register_init_factors,
    check_dude_layers,
    install_dude_variant_,
    inject_adapter,
    load_base_model,
    reset_magnitude,
    svd_init_layer,
)
from .svd import layer_seed, split_factors, top_r_svd

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
    from transformers import BitsAndBytesConfig

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


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency of the quantized path
        raise ImportError("QDuDe needs bitsandbytes: `pip install bitsandbytes`.") from err
    return bnb


def is_bnb_layer(module: nn.Module) -> bool:
    """True for a bitsandbytes `Linear4bit` / `Linear8bitLt` layer."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return False
    bnb = _bnb()
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


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
    from transformers import BitsAndBytesConfig

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
# Quantizing a matrix the way a given bitsandbytes layer does
# ----------------------------------------------------------------------------------------------------


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
        bnb = _bnb()
        if isinstance(layer, bnb.nn.Linear4bit):
            _unpack_cpu_weight(layer)
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
        if isinstance(layer, bnb.nn.Linear8bitLt):
            return cls(bits=8, dtype=torch.float16)
        raise TypeError(f"Expected a bitsandbytes Linear4bit or Linear8bitLt layer, got {type(layer).__name__}.")

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype = torch.float32) -> "QuantSpec":
        """The settings transformers uses for a `BitsAndBytesConfig` when loading in `dtype`."""
        config = validate_quantization_config(config)
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
        F = _bnb().functional
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
        F = _bnb().functional
        if self.bits == 8:
            return F.int8_vectorwise_dequant(quantized.data, quantized.state).float()
        return F.dequantize_4bit(quantized.data, quantized.state).float()

    def roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """``deq(q(weight))`` in float32."""
        return self.dequantize(self.quantize(weight))


def _unpack_cpu_weight(layer: nn.Module) -> None:
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
    bnb = _bnb()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _unpack_cpu_weight(module)
            module.support_avx512bf16_for_cpu = False
        elif isinstance(module, bnb.nn.Linear8bitLt) and not getattr(module, "_dude_scale_hook", False):
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
    bnb = _bnb()
    spec = spec or QuantSpec.from_layer(layer)
    quantized = spec.quantize(weight.to(layer.weight.device))
    if spec.bits == 4:
        layer.weight = bnb.nn.Params4bit(
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
        layer.weight = bnb.nn.Int8Params(
            quantized.data, requires_grad=False, has_fp16_weights=False, CB=quantized.data, SCB=quantized.state
        )
        layer.state.reset_grads()  # the next forward takes CB/SCB from the new weight


# ----------------------------------------------------------------------------------------------------
# The decomposition
# ----------------------------------------------------------------------------------------------------


class QuantizedFactors(NamedTuple):
    """A, B (float32) whose residual ``W0 - s*B@A`` is what the quantized layer stores.

    ``error`` is ``||W0 - (deq(q(W_res)) + s*B@A)||_F`` for these A, B; ``round`` is the
    refinement round they come from (0: plain SVD of W0).
    """

    A: torch.Tensor
    B: torch.Tensor
    error: float
    round: int


def fit_quantized_factors(
    W0: torch.Tensor,
    r: int,
    scaling: float,
    method: str,
    spec: QuantSpec,
    *,
    quant_iters: int = 0,
    svd_niter: Optional[int] = None,
    svd_oversample: int = 8,
    seed: int = 0,
) -> QuantizedFactors:
    """Top-r factors of `W0` for a quantized residual, with optional LoftQ/QPiSSA refinement.

    Round 0 splits the SVD of W0. Each refinement round re-fits A, B to what the previous
    residual's quantization lost, ``A, B <- split(SVD_r(W0 - deq(q(W_res))))``, and forms
    the new residual ``W_res <- W0 - s*B@A``. The returned A, B are always the ones paired
    with the residual that gets stored, and the round with the lowest error is kept, so more
    rounds never increase the error.
    """
    W0 = W0.detach().float()

    def fit(target: torch.Tensor, round_: int) -> tuple[QuantizedFactors, torch.Tensor]:
        svd = top_r_svd(target, r, svd_niter, oversample=svd_oversample, seed=seed)
        A, B = split_factors(svd, scaling, method)
        residual = W0 - scaling * (B @ A)
        dequantized = spec.roundtrip(residual)
        error = torch.linalg.matrix_norm(residual - dequantized).item()
        return QuantizedFactors(A, B, error, round_), dequantized

    best, dequantized = fit(W0, 0)
    for round_ in range(1, quant_iters + 1):
        candidate, dequantized = fit(W0 - dequantized, round_)
        if candidate.error < best.error:
            best = candidate
    return best


class LayerInit(NamedTuple):
    """What the initialisation of one quantized layer achieved (Frobenius norms)."""

    name: str
    error: float  # ||W0 - (deq(q(W_res)) + s*B@A)||
    plain_error: float  # ||W0 - deq(q(W0))||: plain quantization, what QLoRA starts from
    weight_norm: float  # ||W0||
    round: int  # refinement round kept
    from_full_precision: bool  # False: W0 was the dequantized weight of an already-quantized layer


def _write_factor(param: nn.Parameter, value: torch.Tensor) -> None:
    """Store a factor in float32 (QLoRA setups often cast adapters to bf16; DuDe's A, B hold
    W0's principal components, which must not be rounded)."""
    value = value.to(param.device)
    if param.dtype in (torch.float16, torch.bfloat16):
        param.data = value.float()
    else:
        param.data.copy_(value.to(param.dtype))


def quantized_svd_init_layer(
    module: LoraLayer,
    name: str,
    adapter_name: str,
    config: DuDeConfig,
    W0: Optional[torch.Tensor] = None,
) -> LayerInit:
    """`model.svd_init_layer` for a bitsandbytes base: A, B from the SVD of `W0` (the dequantized
    base weight when None), the quantized residual written into the base layer."""
    base = module.get_base_layer()
    spec = QuantSpec.from_layer(base)
    from_full_precision = W0 is not None
    device = base.weight.device
    W0 = (dequantized_weight(base) if W0 is None else W0).to(device=device, dtype=torch.float32)
    r, scaling = module.r[adapter_name], module.scaling[adapter_name]
    factors = fit_quantized_factors(
        W0,
        r,
        scaling,
        config.method,
        spec,
        quant_iters=config.quant_iters,
        svd_niter=config.svd_niter,
        svd_oversample=config.svd_oversample,
        seed=layer_seed(config.svd_seed, name),
    )
    A_param, B_param = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
    with gather_params_ctx([A_param, B_param], modifier_rank=0):
        _write_factor(A_param, factors.A)
        _write_factor(B_param, factors.B)
        residual = W0 - scaling * (B_param.float() @ A_param.float())
        _register_init_factors(module, adapter_name, A_param, B_param)
    set_quantized_weight_(base, residual, spec)
    # Imported here: `io` builds on `model`, as this module does. The fingerprint of the W0 that was
    # decomposed lets a reload check it rebuilds the residual from the same base.
    from .io import record_base_fingerprint_

    record_base_fingerprint_(module, adapter_name, W0)
    plain_error = torch.linalg.matrix_norm(W0 - spec.roundtrip(W0)).item()
    return LayerInit(
        name, factors.error, plain_error, torch.linalg.matrix_norm(W0).item(), factors.round, from_full_precision
    )


# ----------------------------------------------------------------------------------------------------
# Full-precision weights from the checkpoint, one tensor at a time
# ----------------------------------------------------------------------------------------------------

_HUB_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download", "proxies")


class CheckpointWeights:
    """Full-precision Linear weights of a safetensors checkpoint, read one tensor at a time.

    Files are memory-mapped by `safetensors`; only the tensor asked for is materialised.
    """

    def __init__(self, key_to_file: dict[str, str], base_model_prefix: str = "") -> None:
        self.key_to_file = key_to_file
        self.base_model_prefix = base_model_prefix
        self._handles: dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, base_model_prefix: str = "", variant: Optional[str] = None, **hub_kwargs: Any
    ) -> Optional["CheckpointWeights"]:
        """The safetensors weights of a local directory or (cached) hub repository, or None when
        it has none. `hub_kwargs` are `from_pretrained`'s (revision, subfolder, token, ...)."""
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

        hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and v is not None}
        hub_kwargs.update(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)

        def resolve(filename: str) -> Optional[str]:
            try:
                return cached_file(name_or_path, filename, **hub_kwargs)
            except (OSError, ValueError):
                return None

        def with_variant(filename: str) -> str:
            stem, ext = filename.split(".", 1)
            return f"{stem}.{variant}.{ext}" if variant else filename

        index = resolve(with_variant(SAFE_WEIGHTS_INDEX_NAME))
        if index is not None:
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            shards = {shard: resolve(shard) for shard in set(weight_map.values())}
            if any(path is None for path in shards.values()):
                return None
            return cls({key: shards[shard] for key, shard in weight_map.items()}, base_model_prefix)
        single = resolve(with_variant(SAFE_WEIGHTS_NAME))
        if single is None:
            return None
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            keys = list(f.keys())
        return cls({key: single for key in keys}, base_model_prefix)

    def _candidates(self, module_name: str) -> Iterable[str]:
        yield f"{module_name}.weight"
        prefix = self.base_model_prefix
        if prefix:
            if module_name.startswith(prefix + "."):
                yield f"{module_name[len(prefix) + 1:]}.weight"
            else:
                yield f"{prefix}.{module_name}.weight"

    def get(self, module_name: str, shape: tuple[int, int], transposed_ok: bool = False) -> Optional[torch.Tensor]:
        """The ``out x in`` weight of `module_name` (named as in the transformers model), or None
        when the checkpoint has no tensor of that name and shape."""
        from safetensors import safe_open

        for key in self._candidates(module_name):
            path = self.key_to_file.get(key)
            if path is None:
                continue
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework="pt")
            handle = self._handles[path]
            stored = tuple(handle.get_slice(key).get_shape())
            if stored == tuple(shape):
                return handle.get_tensor(key)
            if transposed_ok and stored == tuple(shape)[::-1]:
                return handle.get_tensor(key).T
        return None

    def close(self) -> None:
        self._handles.clear()


def _checkpoint_weights(source: Optional[str], model: nn.Module, source_kwargs: dict) -> Optional[CheckpointWeights]:
    """The full-precision weights behind `model`, unless there are none to read."""
    if source is None:
        return None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "pre_quantized", False):
        return None  # the checkpoint itself stores quantized weights
    if source_kwargs.get("gguf_file"):
        return None
    prefix = getattr(model, "base_model_prefix", "") or ""
    hub_kwargs = {k: v for k, v in source_kwargs.items() if k in _HUB_KWARGS}
    return CheckpointWeights.from_pretrained(
        source, base_model_prefix=prefix, variant=source_kwargs.get("variant"), **hub_kwargs
    )


# ----------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------


def initialize_quantized_dude_(
    model: PeftModel,
    adapter_name: str = "default",
    progress: bool = True,
    checkpoint: Optional[str] = None,
    checkpoint_kwargs: Optional[dict] = None,
) -> list[LayerInit]:
    """`model.initialize_dude_` for a model with a bitsandbytes base, in place.

    `model` is a `PeftModel` (PEFT's LoRA/DoRA layers freshly injected) whose
    `peft_config[adapter_name]` is a `DuDeConfig`. For the SVD methods each target's ``W0`` is
    read from `checkpoint` (the path or hub id the base was loaded from; `checkpoint_kwargs`
    are its `from_pretrained` kwargs) when it has safetensors, else the dequantized base
    weight is used (logged: less accurate). Returns one `LayerInit` per quantized target.
    """
    config = model.peft_config[adapter_name]
    if not isinstance(config, DuDeConfig):
        raise TypeError(f"initialize_quantized_dude_ needs a DuDeConfig, got {type(config).__name__}.")
    check_quantized_model(model.get_base_model())
    prepare_bnb_layers_(model)
    layers = _dude_layers(model, adapter_name)
    check_dude_layers(layers, adapter_name, config)

    reports: list[LayerInit] = []
    if config.uses_svd_init:
        base_model = model.get_base_model()
        names_in_base = {id(m): n for n, m in base_model.named_modules()}
        weights = _checkpoint_weights(checkpoint, base_model, dict(checkpoint_kwargs or {}))
        try:
            for name, module in tqdm(
                layers, desc=f"QDuDe init ({config.method})", disable=not progress or not layers, leave=False
            ):
                base = module.get_base_layer()
                if is_bnb_layer(base):
                    W0 = None
                    if weights is not None:
                        conv1d = getattr(getattr(base, "source_cls", None), "__name__", "") == "Conv1D"
                        W0 = weights.get(names_in_base[id(module)], (base.out_features, base.in_features), conv1d)
                    reports.append(quantized_svd_init_layer(module, name, adapter_name, config, W0))
                else:  # a target kept in full precision (e.g. listed in llm_int8_skip_modules)
                    svd_init_layer(module, name, adapter_name, config)
                if config.has_magnitude:
                    reset_magnitude(module, adapter_name)
        finally:
            if weights is not None:
                weights.close()
        _log_summary(reports, checkpoint)
    install_dude_variant_(model, adapter_name)
    config.base_quantization = base_quantization_record(model)
    from .io import record_base_fingerprints_

    record_base_fingerprints_(model, adapter_name)  # the layers not fingerprinted above
    invalidate_norm_caches(model)
    return reports


def _log_summary(reports: list[LayerInit], checkpoint: Optional[str]) -> None:
    if not reports:
        return
    dequantized = [r.name for r in reports if not r.from_full_precision]
    if dequantized:
        where = f"no full-precision weights could be read from {checkpoint!r}" if checkpoint else "the model object"
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


def _load_quantized(
    model_or_path: Union[str, PreTrainedModel], quantization_config: Any, model_kwargs: dict
) -> tuple[PreTrainedModel, Optional[str], dict, Optional[tempfile.TemporaryDirectory]]:
    """(quantized model, checkpoint to read W0 from, its kwargs, temp dir to clean up)."""
    if isinstance(model_or_path, str):
        if quantization_config is None:
            raise ValueError("get_quantized_dude_model needs a quantization_config to load a path quantized.")
        _check_checkpoint_quantization(model_or_path, model_kwargs)
        model = load_base_model(model_or_path, quantization_config, **model_kwargs)
        return model, model_or_path, model_kwargs, None
    if model_kwargs:
        raise ValueError(f"model_kwargs {sorted(model_kwargs)} only apply when a path is given.")
    if is_quantized_model(model_or_path):
        check_quantized_model(model_or_path)
        if quantization_config is not None:
            logger.warning(
                "The model is already quantized; its own bitsandbytes settings are kept and quantization_config is "
                "ignored."
            )
        return model_or_path, None, {}, None
    if quantization_config is None:
        raise ValueError("get_quantized_dude_model needs a quantization_config for a full-precision model.")
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
    return model, tmp.name, {}, tmp


def _check_checkpoint_quantization(path: str, model_kwargs: dict) -> None:
    """Refuse checkpoints pre-quantized with a scheme DuDe cannot decompose, before loading them."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in model_kwargs.items() if k in _HUB_KWARGS + ("trust_remote_code",)}
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


def get_quantized_dude_model(
    model_or_path: Union[str, PreTrainedModel],
    config: DuDeConfig,
    quantization_config: Any = None,
    *,
    adapter_name: str = "default",
    progress: bool = True,
    **model_kwargs: Any,
) -> PeftModel:
    """A DuDe `PeftModel` on a bitsandbytes 4-bit/8-bit base (what `get_dude_model` calls when
    given a `quantization_config`).

    Args:
        model_or_path: a hub id / local directory (loaded quantized; W0 read from its safetensors),
            a full-precision `PreTrainedModel` (quantized through a temporary save), or an
            already-quantized bitsandbytes model (decomposed from its dequantized weights).
        config: the adapter configuration; `config.quant_iters` rounds of refinement.
        quantization_config: a `transformers.BitsAndBytesConfig` (4-bit NF4/FP4 or 8-bit).
        adapter_name: PEFT adapter name.
        progress: show a progress bar over the layers being decomposed.
        **model_kwargs: passed to `from_pretrained` when a path is given (e.g. ``dtype``,
            ``device_map``, ``revision``).
    """
    if not isinstance(config, DuDeConfig):
        raise TypeError(f"get_quantized_dude_model needs a DuDeConfig, got {type(config).__name__}.")
    if quantization_config is not None:
        quantization_config = validate_quantization_config(quantization_config)
    model, checkpoint, checkpoint_kwargs, tmp = _load_quantized(model_or_path, quantization_config, model_kwargs)
    try:
        peft_model = inject_adapter(model, config, adapter_name)
        initialize_quantized_dude_(peft_model, adapter_name, progress, checkpoint, checkpoint_kwargs)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return peft_model


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
        if not module.merged:
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                if adapter in module.lora_variant:
                    weight = module.lora_variant[adapter].merge_safe(module, adapter, weight)
                else:
                    weight = weight + module.get_delta_weight(adapter).float()
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
    bnb = _bnb()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _unpack_cpu_weight(module)


__all__ = [
    "CheckpointWeights",
    "LayerInit",
    "QuantSpec",
    "QuantizedFactors",
    "check_quantized_model",
    "dequantized_weight",
    "fit_quantized_factors",
    "get_quantized_dude_model",
    "initialize_quantized_dude_",
    "is_bnb_layer",
    "is_quantized_model",
    "prepare_bnb_layers_",
    "merge_and_dequantize",
    "quantized_svd_init_layer",
    "set_quantized_weight_",
    "validate_quantization_config",
]
