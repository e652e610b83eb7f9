"""Reload DuDe adapters exactly, and resume DuDe training runs exactly.

DuDe replaces each frozen base weight by the residual ``W0 - s B0 A0``, so the trained A, B and
magnitude alone do not rebuild the model, and a second (randomized) SVD gives a different
residual. Every DuDe adapter therefore carries, next to PEFT's tensors:

- its initial factors ``lora_dude_init_A/B`` (written by `initialize_dude_`), from which the
  residual is rebuilt from the original base whatever the RNG state: ``W0 - s B0 A0`` computed
  exactly as at initialisation, so the rebuilt residual is bit-identical on the same hardware;
- a fingerprint of each original base weight, ``lora_dude_base_fingerprint`` (a handful of
  numbers per layer, `base_fingerprint`), so an adapter loaded onto the wrong base fails loudly.

PEFT saves both with the adapter (`save_pretrained`, `trainer.save_model`, every Trainer
checkpoint) because their names start with ``lora_``. `load_dude_model` rebuilds a model from a
base and an adapter directory; `prepare_dude_resume` makes ``trainer.train(resume_from_checkpoint=...)``
rebuild the residual the checkpoint was trained against before Trainer restores A, B, m, the
optimizer, the scheduler and the data order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
import warnings
from typing import Any, Callable, Optional, Union

import torch
from peft import PeftModel
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict
from peft.utils.integrations import gather_params_ctx
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .config import SAVED_INIT_MARKER, DuDeConfig
from .layer import invalidate_norm_caches, is_quantized_layer
from .model import (
    INIT_A,
    INIT_B,
    _dude_layers,
    _frozen_weight,
    _register_init_factors,
    _write_frozen_weight,
    inject_adapter,
    install_dude_variant_,
    load_base_model,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
TRAINER_STATE_NAME = "trainer_state.json"
FINGERPRINT = "lora_dude_base_fingerprint"

_FINGERPRINT_PROBES = 4
_FINGERPRINT_SEED = 0xD0DE
# A probe ``u^T W v`` (u, v random signs) has standard deviation ||W||_F over random weights; a cast of the
# base to bf16/fp16, or the rounding in ``W_res + s B0 A0``, moves it by well under 1% of ||W||_F.
_FINGERPRINT_RTOL = 2e-2
# Fields that fix the adapter's shapes and scalings: a checkpoint and the trainer resuming it must agree.
_STRUCTURAL_FIELDS = ("method", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
# Fields that only say how the initial factors were drawn; a resumed run takes the checkpoint's.
_INIT_FIELDS = ("svd_niter", "svd_oversample", "svd_seed", "quant_iters")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------------
# Reading an adapter directory
# ------------------------------------------------------------------------------------------------


def dude_config_from_dict(values: dict[str, Any], config_cls: type = DuDeConfig, source: str = "config") -> DuDeConfig:
    """A `DuDeConfig` (or subclass) from the fields of an ``adapter_config.json``.

    PEFT's own `PeftConfig.from_pretrained` maps ``peft_type="LORA"`` to `LoraConfig`, which drops
    `method` and the SVD settings; this keeps them. Fields this version does not know (written by
    a newer PEFT) are dropped with a warning, as PEFT does.
    """
    if "method" not in values:
        raise ValueError(
            f"{source} has no `method` field, so it is not a DuDe adapter (a plain PEFT LoRA/DoRA adapter?). "
            f"Load it with peft.PeftModel.from_pretrained, or save the adapter from a DuDe model."
        )
    if values.get("init_lora_weights") == SAVED_INIT_MARKER:
        values = {**values, "init_lora_weights": True}
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(values) - known - {"runtime_config"})
    if unknown:
        warnings.warn(f"Ignoring fields {unknown} of {source}, unknown to this version of PEFT/dude_trl.")
    return config_cls(**{k: v for k, v in values.items() if k in known})


def read_dude_config(adapter_dir: Union[str, os.PathLike]) -> DuDeConfig:
    """The `DuDeConfig` saved in `adapter_dir` (its ``adapter_config.json``), `method` included."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"No {CONFIG_NAME} in {os.fspath(adapter_dir)!r}: not a saved adapter directory.")
    try:
        with open(path) as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the save was probably interrupted. Re-save the adapter or use an "
            f"earlier checkpoint."
        ) from err
    return dude_config_from_dict(values, source=path)


def _safetensors_problem(path: str) -> Optional[str]:
    """Why the safetensors file `path` is unreadable (a truncated or damaged file), or None.

    Reads only the header: the file must be exactly 8 + header + the data the header describes.
    """
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"only {size} bytes"
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                return f"header of {header_len} bytes but the file has {size}"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"unreadable header ({err})"
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + header_len + data_end:
        return f"{size} bytes where its header describes {8 + header_len + data_end}"
    return None


def read_adapter_weights(adapter_dir: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter (``adapter_model.safetensors``, else ``adapter_model.bin``) on CPU,
    keyed as PEFT saves them; a truncated or damaged file raises a `ValueError` saying so."""
    adapter_dir = os.fspath(adapter_dir)
    safe_path = os.path.join(adapter_dir, SAFE_WEIGHTS_NAME)
    bin_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    hint = "Re-save the adapter, or load an earlier checkpoint (Trainer keeps the previous ones)."
    if os.path.isfile(safe_path):
        problem = _safetensors_problem(safe_path)
        if problem is None:
            from safetensors.torch import load_file

            try:
                return load_file(safe_path, device="cpu")
            except Exception as err:  # safetensors raises its own error type for damaged files
                problem = str(err)
        raise ValueError(f"{safe_path} is corrupt or truncated ({problem}), e.g. by a run killed while saving. {hint}")
    if os.path.isfile(bin_path):
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several error types for a damaged pickle/zip
            raise ValueError(f"{bin_path} is corrupt or truncated ({err}). {hint}") from err
    raise ValueError(f"No adapter weights ({SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME}) in {adapter_dir!r}.")


# ------------------------------------------------------------------------------------------------
# Base fingerprints
# ------------------------------------------------------------------------------------------------


def base_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """``[||W||_F, u_1^T W v_1, ..., u_k^T W v_k]`` (float32, on CPU) for fixed pseudo-random sign
    vectors u, v: a few numbers that tell one weight from another of the same shape.

    Over random weights each probe has standard deviation ``||W||_F``, so two different bases agree
    on all probes to `_FINGERPRINT_RTOL` with negligible probability, while a cast to bf16/fp16
    moves them by far less. `weight` is ``out x in``.
    """
    W = weight.detach().float()
    out_features, in_features = W.shape
    generator = torch.Generator().manual_seed(_FINGERPRINT_SEED)
    u = torch.randint(0, 2, (out_features, _FINGERPRINT_PROBES), generator=generator).float().mul_(2).sub_(1)
    v = torch.randint(0, 2, (in_features, _FINGERPRINT_PROBES), generator=generator).float().mul_(2).sub_(1)
    probes = ((W @ v.to(W.device)) * u.to(W.device)).sum(dim=0)
    return torch.cat([torch.linalg.vector_norm(W).reshape(1), probes]).cpu()


def _original_weight(module: LoraLayer, adapter_name: str) -> torch.Tensor:
    """The original base ``W0`` (float32, ``out x in``): the base weight as loaded or, when the layer
    already holds a DuDe initialisation, its residual plus its own ``s B0 A0`` (exact up to one
    rounding of the base dtype). Call inside a gather context under ZeRO-3."""
    weight = _frozen_weight(module)
    init_A = getattr(module, INIT_A, None)
    if init_A is not None and adapter_name in init_A:
        A0, B0 = init_A[adapter_name], getattr(module, INIT_B)[adapter_name]
        weight = weight + module.scaling[adapter_name] * (B0.float() @ A0.float()).to(weight.device)
    return weight


def record_base_fingerprint_(module: LoraLayer, adapter_name: str, weight: torch.Tensor) -> None:
    """Store `base_fingerprint(weight)` as the persistent buffer `FINGERPRINT` (saved with the adapter).

    `weight` is the layer's original full-precision base (``out x in``): a quantized initialisation
    must pass the full-precision ``W0`` it decomposed, not the dequantized weight.
    """
    _store_fingerprint(module, adapter_name, base_fingerprint(weight))


def _store_fingerprint(module: LoraLayer, adapter_name: str, fingerprint: torch.Tensor) -> None:
    if not hasattr(module, FINGERPRINT):
        setattr(module, FINGERPRINT, BufferDict(persistent=True))
    device = module.lora_A[adapter_name].weight.device
    getattr(module, FINGERPRINT)[adapter_name] = fingerprint.detach().float().to(device).clone()


def record_base_fingerprints_(model: torch.nn.Module, adapter_name: str = "default") -> None:
    """Fingerprint the original base of every layer of `adapter_name` (see `base_fingerprint`).

    Call once, at the end of `initialize_dude_`: ``W0`` is recovered as the residual plus
    ``s B0 A0``. Layers holding a quantized residual are skipped (it has lost ``W0``'s low bits):
    a quantized initialisation calls `record_base_fingerprint_` with the full-precision ``W0``.
    """
    for _, module in _dude_layers(model, adapter_name):
        if is_quantized_layer(module.get_base_layer()) and _held(module, INIT_A, adapter_name) is not None:
            continue
        with gather_params_ctx([module.get_base_layer().weight], modifier_rank=None):
            record_base_fingerprint_(module, adapter_name, _original_weight(module, adapter_name))


def _held(module: LoraLayer, attr: str, adapter_name: str) -> Optional[torch.Tensor]:
    buffers = getattr(module, attr, None)
    return buffers[adapter_name] if buffers is not None and adapter_name in buffers else None


def _check_fingerprint(layer_name: str, expected: torch.Tensor, actual: torch.Tensor, base_hint: str) -> None:
    expected, actual = expected.float().cpu(), actual.float().cpu()
    tolerance = _FINGERPRINT_RTOL * expected[0].abs().clamp_min(torch.finfo(torch.float32).tiny)
    if expected.shape != actual.shape or bool(((expected - actual).abs() > tolerance).any()):
        raise ValueError(
            f"The base weight of {layer_name!r} is not the one this adapter was trained on (fingerprint "
            f"{[round(x, 4) for x in expected.tolist()]}, this base gives {[round(x, 4) for x in actual.tolist()]}). "
            f"Load the adapter onto its own base model{base_hint}: another model or revision with the same shapes "
            f"would silently compute something else."
        )


# ------------------------------------------------------------------------------------------------
# Rebuilding layers
# ------------------------------------------------------------------------------------------------


def rebuild_residual_(
    module: LoraLayer,
    adapter_name: str,
    init_A: Optional[torch.Tensor],
    init_B: Optional[torch.Tensor],
    *,
    fingerprint: Optional[torch.Tensor] = None,
    layer_name: str = "",
    base_hint: str = "",
) -> None:
    """Give one layer the frozen base a saved adapter was trained against, in place.

    With initial factors (SVD methods) the base becomes ``W0 - s B0 A0``, computed exactly as
    `svd_init_layer` computes it (bit-identical from the same ``W0`` on the same hardware), and the
    factors are recorded as the layer's `lora_dude_init_A/B`. ``W0`` is the base as loaded or, when
    the layer already holds a DuDe initialisation with other factors (a trainer that initialised
    itself before resuming), its residual plus its own ``s B0' A0'``; with the same factors
    nothing is rewritten. Without factors (``lora``/``dora``) the base is left as it is.

    `fingerprint` (from the adapter) is checked against the base and stored; without one, the
    base's own fingerprint is stored. Rewriting a residual needs a full-precision base (a
    quantized one is rebuilt in full precision and quantized afterwards); a layer holding a
    quantized residual is only checked against the fingerprint it holds. Gathers the weight
    under ZeRO-3.
    """
    base = module.get_base_layer()
    held_A, held_B = _held(module, INIT_A, adapter_name), _held(module, INIT_B, adapter_name)
    unchanged = (
        init_A is not None
        and held_A is not None
        and held_A.shape == init_A.shape
        and held_B.shape == init_B.shape
        and torch.equal(held_A.cpu(), init_A.to(held_A.dtype).cpu())
        and torch.equal(held_B.cpu(), init_B.to(held_B.dtype).cpu())
    )
    rewrite = init_A is not None and not unchanged
    quantized = is_quantized_layer(base)
    if rewrite and quantized:
        raise ValueError(
            f"The residual of {layer_name or 'this layer'} must be rebuilt from other initial factors, but its base "
            f"is a quantized {type(base).__name__}, which cannot give back the full-precision W0. Load the adapter "
            f"with load_dude_model(path, adapter_dir, quantization_config=...), or resume with the checkpoint's "
            f"DuDeConfig (same svd_seed/svd_niter) so that the factors agree."
        )
    own = _held(module, FINGERPRINT, adapter_name)
    # A quantized residual has lost W0's low bits: it can be checked against a held fingerprint only.
    can_fingerprint = not (quantized and held_A is not None)
    if rewrite or (own is None and can_fingerprint):
        with gather_params_ctx([base.weight], modifier_rank=0):
            W0 = _original_weight(module, adapter_name)
            if own is None:
                own = base_fingerprint(W0)
            if fingerprint is not None:
                _check_fingerprint(layer_name, fingerprint, own, base_hint)
            if rewrite:
                A0, B0 = init_A.to(W0.device), init_B.to(W0.device)
                residual = W0 - module.scaling[adapter_name] * (B0.float() @ A0.float())
                _write_frozen_weight(module, residual)
                _register_init_factors(module, adapter_name, A0, B0)
    elif fingerprint is not None and own is not None:
        _check_fingerprint(layer_name, fingerprint, own, base_hint)
    if fingerprint is not None or own is not None:
        _store_fingerprint(module, adapter_name, fingerprint if fingerprint is not None else own)


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def _expected_shapes(model: PeftModel, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """Adapter tensors (as PEFT saves them) that the injected layers expect, and their shapes."""
    config = model.peft_config[adapter_name]
    expected: dict[str, tuple[int, ...]] = {}
    for name, module in _dude_layers(model, adapter_name):
        A_shape, B_shape = _shape(module.lora_A[adapter_name].weight), _shape(module.lora_B[adapter_name].weight)
        expected[f"{name}.lora_A.weight"] = A_shape
        expected[f"{name}.lora_B.weight"] = B_shape
        if module.lora_B[adapter_name].bias is not None:
            expected[f"{name}.lora_B.bias"] = (B_shape[0],)
        if config.has_magnitude:
            expected[f"{name}.lora_magnitude_vector"] = (B_shape[0],)
        if config.uses_svd_init:
            expected[f"{name}.{INIT_A}"] = A_shape
            expected[f"{name}.{INIT_B}"] = B_shape
    return expected


def check_adapter_fits(model: PeftModel, weights: dict[str, torch.Tensor], adapter_name: str, source: str) -> None:
    """Raise a `ValueError` naming the problem unless `weights` hold exactly the adapter tensors the
    layers of `model` expect, with their shapes (initial factors included for the SVD methods)."""
    config = model.peft_config[adapter_name]
    expected = _expected_shapes(model, adapter_name)
    layer_names = {key.rsplit(".lora_", 1)[0] for key in expected}
    missing = [k for k in expected if k not in weights]
    missing_init = [k for k in missing if INIT_A in k or INIT_B in k]
    if missing_init and len(missing_init) == len(missing):
        raise ValueError(
            f"{source} has no initial factors ({INIT_A}/{INIT_B}) for {len(missing_init) // 2} layers, e.g. "
            f"{missing_init[0]!r}. Without them the frozen residual W0 - s*B0@A0 of method={config.method!r} cannot "
            f"be rebuilt (a randomized SVD run again gives another one). The adapter was not saved from a dude_trl "
            f"model (PEFT's PiSSA?) or was stripped; save it again from the training run."
        )
    unexpected = [
        k for k in weights if ".lora_" in k and k not in expected and not (
            k.endswith(f".{FINGERPRINT}") and k.rsplit(".", 1)[0] in layer_names
        )
    ]
    mismatched = [
        f"{k}: {tuple(weights[k].shape)} in the adapter, {expected[k]} expected" for k in expected
        if k in weights and tuple(weights[k].shape) != expected[k]
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have other shapes ({'; '.join(mismatched[:3])})")
    if missing:
        problems.append(f"{len(missing)} tensors are missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensors belong to no adapted layer of this base ({', '.join(unexpected[:3])})"
        )
    if problems:
        base_hint = f" ({config.base_model_name_or_path})" if config.base_model_name_or_path else ""
        raise ValueError(
            f"The adapter in {source} does not fit this {type(model.get_base_model()).__name__}: "
            f"{'; '.join(problems)}. It was trained on a different base model or with another r/target_modules; "
            f"load it onto the base it was trained on{base_hint}."
        )


def restore_dude_adapter_(
    model: PeftModel,
    weights: dict[str, torch.Tensor],
    adapter_name: str = "default",
    *,
    source: str = "the adapter",
    progress: bool = True,
    rebuild_layer: Callable[..., None] = rebuild_residual_,
) -> PeftModel:
    """Load saved DuDe adapter tensors into freshly injected layers on the *original* base, in place.

    Checks the tensors fit (`check_adapter_fits`), rebuilds each layer's base from the saved
    initial factors after checking it against the saved fingerprint (`rebuild_layer`, with
    `rebuild_residual_`'s signature), then loads A, B, the magnitude and the rest through PEFT
    and installs the DuDe forward.
    """
    config = model.peft_config[adapter_name]
    check_adapter_fits(model, weights, adapter_name, source)
    base_hint = f" ({config.base_model_name_or_path})" if config.base_model_name_or_path else ""
    layers = _dude_layers(model, adapter_name)
    unverified = 0
    for name, module in tqdm(layers, desc="DuDe load", disable=not progress or not layers, leave=False):
        fingerprint = weights.get(f"{name}.{FINGERPRINT}")
        unverified += fingerprint is None
        init = (weights[f"{name}.{INIT_A}"], weights[f"{name}.{INIT_B}"]) if config.uses_svd_init else (None, None)
        rebuild_layer(module, adapter_name, *init, fingerprint=fingerprint, layer_name=name, base_hint=base_hint)
    if unverified:
        logger.warning(
            "%s carries no base fingerprint for %d of %d layers (saved by an older dude_trl): the base model cannot "
            "be verified; make sure it is the one the adapter was trained on.", source, unverified, len(layers)
        )
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    # A fingerprint the adapter lacked was computed from this base above; anything else must be loaded.
    missing = [k for k in result.missing_keys if ".lora_" in k and adapter_name in k and FINGERPRINT not in k]
    if missing:
        raise ValueError(f"Loading {source} left adapter tensors unset: {missing[:5]}.")
    install_dude_variant_(model, adapter_name)
    invalidate_norm_caches(model)
    return model


def load_dude_model(
    model_or_path: Union[str, PreTrainedModel],
    adapter_dir: Union[str, os.PathLike],
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    quantization_config: Optional[Any] = None,
    progress: bool = True,
    **model_kwargs: Any,
) -> PeftModel:
    """The `PeftModel` a saved DuDe (or baseline) adapter was trained as, rebuilt from the original base.

    The residual ``W0 - s B0 A0`` is rebuilt from the initial factors stored with the adapter, so
    the result does not depend on the RNG state or on how the SVD was computed; a base that is not
    the one the adapter was trained on (other shapes, or same shapes but other weights) raises a
    `ValueError`. Under ZeRO-3 (a `HfDeepSpeedConfig` alive while loading) each base weight is
    gathered and rewritten from rank 0.

    Args:
        model_or_path: the original base model, or its hub id / local directory.
        adapter_dir: a directory written by `save_pretrained`, `trainer.save_model` or a Trainer checkpoint.
        adapter_name: PEFT adapter name.
        is_trainable: keep the adapter trainable (to continue training); frozen otherwise.
        quantization_config: a `transformers.BitsAndBytesConfig` for a 4-bit/8-bit base.
        progress: show a progress bar over the layers.
        **model_kwargs: passed to `from_pretrained` when a path is given (e.g. ``dtype``).
    """
    if isinstance(model_or_path, PeftModel):
        raise ValueError("load_dude_model needs the original base model, not a PeftModel; pass model.get_base_model().")
    config = read_dude_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)
    config.inference_mode = not is_trainable
    source = os.fspath(adapter_dir)
    from . import quantized

    quantized_object = not isinstance(model_or_path, str) and quantized.is_quantized_model(model_or_path)
    if quantization_config is None and config.base_quantization is not None and not quantized_object:
        raise ValueError(
            f"{source} was trained on a bitsandbytes base ({config.base_quantization}): its residual is that quantized "
            f"matrix, and a full-precision base would give other outputs. {_requantize_hint(config.base_quantization)}"
        )
    if quantization_config is not None or quantized_object:
        return _load_onto_quantized_base(
            model_or_path, config, weights, quantization_config, adapter_name, source, progress, model_kwargs
        )
    model = load_base_model(model_or_path, **model_kwargs)
    peft_model = inject_adapter(model, config, adapter_name)
    return restore_dude_adapter_(peft_model, weights, adapter_name, source=source, progress=progress)


def _requantize_hint(record: dict[str, Any]) -> str:
    return (
        f"Pass quantization_config=dude_trl.quantized.bnb_config_from_record({record}) (the scheme used in "
        f"training); `python -m dude_trl.export` does this itself."
    )


def _load_onto_quantized_base(
    model_or_path: Union[str, PreTrainedModel],
    config: DuDeConfig,
    weights: dict[str, torch.Tensor],
    quantization_config: Any,
    adapter_name: str,
    source: str,
    progress: bool,
    model_kwargs: dict[str, Any],
) -> PeftModel:
    """`load_dude_model` on a bitsandbytes base (QDuDe, `dude_trl.quantized`).

    The base loads quantized exactly as `get_quantized_dude_model` loads it, and each quantized
    target gets ``q(W0 - s B0 A0)``: the residual computed in float32 from the full-precision
    ``W0``, read from the same source as at initialisation (the checkpoint's safetensors, else the
    dequantized weight), then quantized with the layer's own settings, so the stored residual is
    the one the adapter was trained on.
    """
    from . import quantized

    if quantization_config is not None:
        quantization_config = quantized.validate_quantization_config(quantization_config)
    model, checkpoint, checkpoint_kwargs, tmp = quantized._load_quantized(
        model_or_path, quantization_config, dict(model_kwargs)
    )
    try:
        found = quantized.base_quantization_record(model)
        if config.base_quantization is not None and found != config.base_quantization:
            raise ValueError(
                f"{source} was trained on a bitsandbytes base quantized as {config.base_quantization}, but this base is "
                f"quantized as {found}: the rebuilt residual would differ. {_requantize_hint(config.base_quantization)}"
            )
        if config.base_quantization is None and config.uses_svd_init:
            logger.warning(
                "%s was trained on a full-precision base; on this quantized base its residual is quantized, so the "
                "outputs differ from the trained model's by the quantization error.", source
            )
        peft_model = inject_adapter(model, config, adapter_name)
        quantized.prepare_bnb_layers_(peft_model)
        full_precision = quantized._checkpoint_weights(checkpoint, model, checkpoint_kwargs)
        names_in_base = {id(m): n for n, m in model.named_modules()}

        def rebuild_layer(module, adapter_name, init_A, init_B, *, fingerprint, layer_name, base_hint):
            base = module.get_base_layer()
            if init_A is None or not quantized.is_bnb_layer(base):
                # A QLoRA/QDoRA base stays as loaded; a target kept in full precision is rebuilt as usual.
                rebuild_residual_(module, adapter_name, init_A, init_B, fingerprint=fingerprint,
                                  layer_name=layer_name, base_hint=base_hint)
                return
            W0 = None
            if full_precision is not None:
                conv1d = getattr(getattr(base, "source_cls", None), "__name__", "") == "Conv1D"
                W0 = full_precision.get(names_in_base[id(module)], (base.out_features, base.in_features), conv1d)
            if W0 is None:
                W0 = quantized.dequantized_weight(base)
            W0 = W0.to(device=base.weight.device, dtype=torch.float32)
            own = base_fingerprint(W0)
            if fingerprint is not None:
                _check_fingerprint(layer_name, fingerprint, own, base_hint)
            A0, B0 = init_A.to(W0.device), init_B.to(W0.device)
            quantized.set_quantized_weight_(base, W0 - module.scaling[adapter_name] * (B0.float() @ A0.float()))
            _register_init_factors(module, adapter_name, A0, B0)
            _store_fingerprint(module, adapter_name, fingerprint if fingerprint is not None else own)

        try:
            return restore_dude_adapter_(
                peft_model, weights, adapter_name, source=source, progress=progress, rebuild_layer=rebuild_layer
            )
        finally:
            if full_precision is not None:
                full_precision.close()
    finally:
        if tmp is not None:
            tmp.cleanup()


# ------------------------------------------------------------------------------------------------
# Resuming a run
# ------------------------------------------------------------------------------------------------


def checkpoint_problem(checkpoint_dir: Union[str, os.PathLike]) -> Optional[str]:
    """Why `checkpoint_dir` is not a complete Trainer checkpoint, or None when it is.

    Trainer writes ``trainer_state.json`` last, after the model, optimizer, scheduler and RNG
    states, so a run killed while saving leaves a checkpoint without it (or with a truncated one).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        return "no such directory"
    state_path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if not os.path.isfile(state_path):
        return f"no {TRAINER_STATE_NAME} (Trainer writes it last, so the save did not finish)"
    try:
        with open(state_path) as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_NAME} is truncated"
    safe_path = os.path.join(checkpoint_dir, SAFE_WEIGHTS_NAME)
    if os.path.isfile(safe_path):
        problem = _safetensors_problem(safe_path)
        if problem is not None:
            return f"{SAFE_WEIGHTS_NAME} is damaged ({problem})"
    return None


def last_complete_checkpoint(output_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The newest complete ``checkpoint-N`` in `output_dir` (see `checkpoint_problem`), or None.

    Newer incomplete ones, left by a run killed while saving, are skipped with a warning; Trainer's
    rotation deletes old checkpoints only after a new one is saved, so an earlier one survives.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        ((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT_DIR.match(name))),
        reverse=True,
    )
    for _, name in steps:
        path = os.path.join(output_dir, name)
        if not os.path.isdir(path):
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping checkpoint %s: %s (a run killed while saving?).", path, problem)
    return None


def restore_residual_for_resume_(
    model: PeftModel, checkpoint_dir: Union[str, os.PathLike], adapter_name: str = "default"
) -> None:
    """Make the frozen bases of `model` the ones the checkpoint's adapter was trained against.

    `model` already holds a DuDe initialisation (the resuming trainer made one, possibly with other
    factors: another `svd_seed`, another device). Its residuals are rebuilt from the checkpoint's
    initial factors and its config takes the checkpoint's SVD settings; A, B and the magnitude are
    left to Trainer, which loads them (with the optimizer) right after.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    saved = read_dude_config(checkpoint_dir)
    current = model.peft_config[adapter_name]
    differences = [
        f"{field}={getattr(saved, field)!r} in the checkpoint, {getattr(current, field)!r} here"
        for field in _STRUCTURAL_FIELDS
        if getattr(saved, field) != getattr(current, field)
    ]
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: it was trained with another adapter configuration "
            f"({'; '.join(differences)}). Build the resuming trainer with the checkpoint's config: "
            f"dude_trl.io.read_dude_config({checkpoint_dir!r})."
        )
    weights = read_adapter_weights(checkpoint_dir)
    check_adapter_fits(model, weights, adapter_name, checkpoint_dir)
    base_hint = f" ({saved.base_model_name_or_path})" if saved.base_model_name_or_path else ""
    for name, module in _dude_layers(model, adapter_name):
        init = (weights[f"{name}.{INIT_A}"], weights[f"{name}.{INIT_B}"]) if saved.uses_svd_init else (None, None)
        rebuild_residual_(
            module, adapter_name, *init, fingerprint=weights.get(f"{name}.{FINGERPRINT}"), layer_name=name,
            base_hint=base_hint,
        )
    for field in _INIT_FIELDS:
        setattr(current, field, getattr(saved, field))
    invalidate_norm_caches(model)


def prepare_dude_resume(trainer: Any, resume_from_checkpoint: Union[str, bool, None]) -> Optional[str]:
    """What `DuDeSFTTrainer.train` does before handing `resume_from_checkpoint` to `Trainer.train`.

    - ``True`` resolves to the newest *complete* checkpoint of ``args.output_dir`` (Trainer would
      take the newest directory, even one a crash left half-written); an explicit path must be
      complete, else a `ValueError` says what is wrong with it.
    - For each DuDe adapter of the model, the frozen residual is rebuilt from the checkpoint's
      initial factors (`restore_residual_for_resume_`), so the resumed run continues on exactly
      the base it was trained against, whatever SVD this process drew.

    Returns the checkpoint path for `Trainer.train` (None when not resuming).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        checkpoint = last_complete_checkpoint(trainer.args.output_dir)
        if checkpoint is None:
            raise ValueError(f"No complete checkpoint found in output directory ({trainer.args.output_dir}).")
    else:
        checkpoint = os.fspath(resume_from_checkpoint)
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise ValueError(
                f"Cannot resume from {checkpoint}: {problem}. Pick an earlier checkpoint, or pass "
                f"resume_from_checkpoint=True to take the newest complete one."
            )
    model = trainer.model
    if isinstance(model, PeftModel):
        for adapter_name, config in model.peft_config.items():
            if isinstance(config, DuDeConfig):
                # PEFT saves the "default" adapter at the top level and any other in a sub-directory.
                adapter_dir = checkpoint if adapter_name == "default" else os.path.join(checkpoint, adapter_name)
                restore_residual_for_resume_(model, adapter_dir, adapter_name)
    return checkpoint


__all__ = [
    "FINGERPRINT",
    "base_fingerprint",
    "check_adapter_fits",
    "checkpoint_problem",
    "dude_config_from_dict",
    "install_dude_variant_",
    "last_complete_checkpoint",
    "load_dude_model",
    "prepare_dude_resume",
    "read_adapter_weights",
    "read_dude_config",
    "rebuild_residual_",
    "record_base_fingerprint_",
    "record_base_fingerprints_",
    "restore_dude_adapter_",
    "restore_residual_for_resume_",
]
