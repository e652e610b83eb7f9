"""Every way out of a DuDe run: a vanilla PEFT adapter for the unmodified base, or a merged model.

A DuDe layer computes with ``W_res + s B A`` where ``W_res = W0 - s B0 A0``. On the original
base ``W0`` the same matrix is a rank-2r LoRA update with

    B' = [B, -B0]   (out x 2r),    A' = [A; A0]   (2r x in),    s' = s,

since ``W0 + s (B A - B0 A0) = W_res + s B A``. The direction DoRA normalises is the same matrix,
so the trained magnitude carries over unchanged. `export_peft_adapter` writes that adapter with
plain `LoraConfig` fields (``use_dora=True`` for the magnitude methods, ``use_rslora=False`` and
``lora_alpha = s * 2r``, per-layer `rank_pattern`/`alpha_pattern` where layers differ), which
`peft.PeftModel.from_pretrained` loads without dude_trl installed. The ``lora``/``dora`` baselines
never change the base and are written as they are.

`export_merged_model` saves ``merge_and_unload()``: a plain transformers model for servers
without DoRA support (vLLM). The CLI (`dude_trl/export/__main__.py`) wraps both:

    python -m dude_trl.export --adapter DIR --base MODEL --to merged|dora --out DIR
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
from typing import Optional, Union

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedModel

from ..bases import base_for
from ..config import DuDeConfig
from ..layers import FINGERPRINT, INIT_A, INIT_B, dude_layers
from ..norms import is_quantized_layer
from ..saving import SAFE_WEIGHTS_NAME

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."
_DUDE_ONLY_KEYS = (INIT_A, INIT_B, FINGERPRINT)


def _dude_config(model: PeftModel, adapter_name: str) -> DuDeConfig:
    if not isinstance(model, PeftModel):
        raise TypeError(f"Expected a peft.PeftModel with a DuDe adapter, got {type(model).__name__}.")
    if adapter_name not in model.peft_config:
        raise ValueError(f"The model has no adapter {adapter_name!r} (it has {sorted(model.peft_config)}).")
    config = model.peft_config[adapter_name]
    if not isinstance(config, DuDeConfig):
        raise TypeError(
            f"Adapter {adapter_name!r} has a {type(config).__name__}, not a DuDeConfig; it is already a plain PEFT "
            f"adapter (save it with model.save_pretrained)."
        )
    return config


def _has_quantized_base(model: PeftModel, adapter_name: str) -> bool:
    return any(is_quantized_layer(module.get_base_layer()) for _, module in dude_layers(model, adapter_name))


def _check_exportable(model: PeftModel, adapter_name: str) -> None:
    for name, module in dude_layers(model, adapter_name):
        if module.merged:
            raise ValueError(f"Layer {name!r} has merged adapters; call model.unmerge_adapter() before exporting.")
        params = [module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight]
        if any(hasattr(p, "ds_id") for p in params):
            raise ValueError(
                "The model is partitioned by DeepSpeed ZeRO-3; save the adapter (trainer.save_model) and export the "
                "saved directory: python -m dude_trl.export --adapter DIR --base MODEL --to dora --out DIR."
            )


def _rank_and_alpha(layers: dict[str, tuple[int, float]], default: tuple[int, float]) -> tuple[dict, dict]:
    """`rank_pattern` / `alpha_pattern` (full module names, as PEFT's own conversions write them)
    for the layers whose (rank, alpha) differ from `default`."""
    rank_pattern, alpha_pattern = {}, {}
    for name, (rank, alpha) in layers.items():
        if rank != default[0]:
            rank_pattern[name] = rank
        if alpha != default[1] or rank != default[0]:
            alpha_pattern[name] = alpha
    return rank_pattern, alpha_pattern


def peft_adapter_state_dict(
    model: PeftModel, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The tensors and `LoraConfig` of the vanilla PEFT adapter equivalent to a DuDe adapter on the
    original base (module docstring): rank ``2r`` with ``[B, -B0]``, ``[A; A0]`` and the trained
    magnitude for the SVD methods, the adapter itself for ``lora``/``dora``."""
    config = _dude_config(model, adapter_name)
    _check_exportable(model, adapter_name)
    if _has_quantized_base(model, adapter_name):
        logger.warning(
            "The model's base is quantized: on the full-precision base the exported adapter computes with the exact "
            "residual W0 - s*B0@A0, where the trained model used its quantized version. For the quantized model's "
            "own outputs merge it instead (merge_to_base dequantizes)."
        )
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    layers = dude_layers(model, adapter_name)

    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    values = {k: v for k, v in config.to_dict().items() if k in fields}
    values.update(use_dora=config.has_magnitude, init_lora_weights=True, inference_mode=True)
    if config.uses_svd_init:
        exported: dict[str, tuple[int, float]] = {}
        for name, module in layers:
            A_key, B_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            A0, B0 = state.get(f"{name}.{INIT_A}"), state.get(f"{name}.{INIT_B}")
            if A0 is None or B0 is None:
                raise ValueError(
                    f"Layer {name!r} holds no initial factors ({INIT_A}/{INIT_B}), so its residual cannot be expressed "
                    f"on the original base; export a model built by get_dude_model or load_dude_model."
                )
            A, B = state[A_key], state[B_key]
            state[A_key] = torch.cat([A, A0.to(A.dtype)], dim=0)
            state[B_key] = torch.cat([B, -B0.to(B.dtype)], dim=1)
            rank = 2 * module.r[adapter_name]
            exported[name.removeprefix(_PEFT_PREFIX)] = (rank, module.scaling[adapter_name] * rank)
        # The config's own (rank, alpha) stays the default when a layer uses it, else the most common
        # pair; the other layers get pattern entries.
        default_scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        default = (2 * config.r, default_scaling * 2 * config.r)
        if default not in exported.values() and exported:
            default = Counter(exported.values()).most_common(1)[0][0]
        rank_pattern, alpha_pattern = _rank_and_alpha(exported, default)
        values.update(r=default[0], lora_alpha=default[1], use_rslora=False)
        values.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in state.items()
        if not any(k.endswith(f".{key}") for key in _DUDE_ONLY_KEYS)
    }
    return state, LoraConfig(**values)


def _output_folder(output_dir: Union[str, os.PathLike]) -> str:
    """`output_dir` as a path; an existing file there is refused (transformers' `save_pretrained`
    would only log an error, write nothing and return as if it had saved)."""
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"{output_dir!r} exists and is not a directory; nothing was written.")
    return output_dir


def export_peft_adapter(
    model: PeftModel,
    output_dir: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    base_model_name_or_path: Optional[str] = None,
) -> str:
    """Write the vanilla PEFT adapter equivalent to `model`'s DuDe adapter on the original base.

    The directory holds ``adapter_config.json`` (a plain `LoraConfig`) and
    ``adapter_model.safetensors``; ``PeftModel.from_pretrained(original_base, output_dir)`` then
    computes what the DuDe model computes, without dude_trl installed (DoRA for ``dude``,
    ``dude_a``, ``dude_b``, ``dora``; LoRA for ``pissa``, ``lora``). Returns `output_dir`; an
    existing file there raises `NotADirectoryError`.
    """
    output_dir = _output_folder(output_dir)
    state, config = peft_adapter_state_dict(model, adapter_name)
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    os.makedirs(output_dir, exist_ok=True)
    # Weights first, through a temporary name, then the config: an interrupted export never
    # leaves a config next to a half-written weights file.
    weights_path = os.path.join(output_dir, SAFE_WEIGHTS_NAME)
    save_file(state, weights_path + ".tmp", metadata={"format": "pt"})
    os.replace(weights_path + ".tmp", weights_path)
    config.save_pretrained(output_dir)
    return output_dir


def merge_to_base(model: PeftModel, adapter_name: str = "default") -> PreTrainedModel:
    """The plain transformers model computing what `model` computes: each adapted weight becomes
    ``m / ||W_res + s B A||_row * (W_res + s B A)`` (``W_res + s B A`` without a magnitude), and
    the PEFT layers and DuDe buffers are dropped. On a bitsandbytes base the result is full
    precision, merged with the dequantized residual (`dude_trl.bases.bnb.merge_and_dequantize`;
    PEFT's own merge would re-quantize it). `model` is consumed."""
    _dude_config(model, adapter_name)
    _check_exportable(model, adapter_name)
    model.set_adapter(adapter_name)
    with base_for(model) as base:
        return base.merge_and_unload(model)


def export_merged_model(
    model: PeftModel,
    output_dir: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Merge (`merge_to_base`) and `save_pretrained` the result into `output_dir`, cast to `dtype`
    after merging (merge in float32 for the most exact result). `model` is consumed. An existing
    file at `output_dir` raises `NotADirectoryError` before anything is merged."""
    output_dir = _output_folder(output_dir)
    merged = merge_to_base(model, adapter_name)
    if dtype is not None:
        merged = merged.to(dtype)
    os.makedirs(output_dir, exist_ok=True)
    merged.save_pretrained(output_dir)
    return output_dir


# The names of earlier releases: the export is DoRA only for the magnitude methods.
dora_adapter_state_dict = peft_adapter_state_dict
export_dora_adapter = export_peft_adapter
