"""Saving and reloading DuDe adapters exactly.

DuDe replaces each frozen base weight by the residual ``W0 - s B0 A0``, so the trained A, B and
magnitude alone do not rebuild the model, and a second (randomized) SVD gives a different
residual. Every DuDe adapter therefore carries, next to PEFT's tensors, its initial factors
``lora_dude_init_A/B`` and a fingerprint of each original base weight (`dude_trl.layers`). PEFT
saves both with the adapter (`save_pretrained`, `trainer.save_model`, every Trainer checkpoint)
because their names start with ``lora_``.

`load_dude_model` rebuilds a model from its original base and an adapter directory: each
residual is computed from the base's ``W0`` and the saved factors exactly as at initialisation
(bit-identical on the same hardware), on a full-precision or a bitsandbytes base alike
(`dude_trl.bases`), after the base is checked against the saved fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict
from peft.utils.integrations import gather_params_ctx
from safetensors.torch import load_file
from tqdm.auto import tqdm
from torch import nn
from transformers import PreTrainedModel

from .bases import FullPrecisionBase, base_for
from .bases.bnb import is_quantized_model, load_quantized_base
from .bases.full import load_base_model
from .config import DuDeConfig, dude_config_from_dict
from .fingerprint import base_fingerprint, check_fingerprint, store_fingerprint
from .layers import (
    FINGERPRINT,
    INIT_A,
    INIT_B,
    dude_layers,
    held_buffer,
    inject_adapter,
    install_dude_variant_,
    register_init_factors,
    untie_shared_weights_,
)
from .norms import invalidate_norm_caches
from .pretrained import install_pretrained_view_

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"


# ------------------------------------------------------------------------------------------------
# Reading an adapter directory
# ------------------------------------------------------------------------------------------------


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


def safetensors_problem(path: str) -> Optional[str]:
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
        problem = safetensors_problem(safe_path)
        weights = None
        if problem is None:
            try:
                weights = load_file(safe_path, device="cpu")
            except Exception as err:  # safetensors raises its own error type for damaged files
                problem = str(err)
        if weights is not None:
            return check_finite(weights, safe_path)
        raise ValueError(f"{safe_path} is corrupt or truncated ({problem}), e.g. by a run killed while saving. {hint}")
    if os.path.isfile(bin_path):
        try:
            weights = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several error types for a damaged pickle/zip
            raise ValueError(f"{bin_path} is corrupt or truncated ({err}). {hint}") from err
        return check_finite(weights, bin_path)
    raise ValueError(f"No adapter weights ({SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME}) in {adapter_dir!r}.")


def check_finite(weights: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """`weights`, unless one of them holds NaN/inf: then a `ValueError` naming the tensors
    (a diverged run, or a file whose bytes were overwritten) instead of a model that outputs NaN."""
    bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"{path} holds NaN or infinite values in {len(bad)} of {len(weights)} tensors (e.g. {', '.join(bad[:3])}): "
            f"the training run diverged or the file was damaged. Load an earlier checkpoint, or lower the learning "
            f"rate and train again."
        )
    return weights


# ------------------------------------------------------------------------------------------------
# Rebuilding layers
# ------------------------------------------------------------------------------------------------


def rebuild_residual_(
    module: LoraLayer,
    adapter_name: str,
    init_A: Optional[torch.Tensor],
    init_B: Optional[torch.Tensor],
    base: FullPrecisionBase,
    *,
    fingerprint: Optional[torch.Tensor] = None,
    layer_name: str = "",
    base_hint: str = "",
) -> None:
    """Give one layer the frozen base a saved adapter was trained against, in place.

    With initial factors (SVD methods) the base becomes ``W0 - s B0 A0``, computed exactly as at
    initialisation (bit-identical from the same ``W0`` on the same hardware) and stored through
    the backend `base` (copied, or quantized with the layer's own settings), and the factors are
    recorded as the layer's `lora_dude_init_A/B`. ``W0`` is the base as loaded (for a quantized
    base: the checkpoint's full-precision weight) or, when the layer already holds a DuDe
    initialisation with other factors (a trainer that initialised itself before resuming), its
    residual plus its own ``s B0' A0'``; with the same factors nothing is rewritten. Without
    factors (``lora``/``dora``) the base is left as it is.

    `fingerprint` (from the adapter) is checked against the base and stored; without one, the
    base's own fingerprint is stored. A layer holding a quantized residual cannot give ``W0``
    back: it is only checked against the fingerprint it holds. Gathers the weight under ZeRO-3.
    """
    held_A, held_B = held_buffer(module, INIT_A, adapter_name), held_buffer(module, INIT_B, adapter_name)
    unchanged = (
        init_A is not None
        and held_A is not None
        and held_A.shape == init_A.shape
        and held_B.shape == init_B.shape
        and torch.equal(held_A.cpu(), init_A.to(held_A.dtype).cpu())
        and torch.equal(held_B.cpu(), init_B.to(held_B.dtype).cpu())
    )
    rewrite = init_A is not None and not unchanged
    own = held_buffer(module, FINGERPRINT, adapter_name)
    if rewrite or own is None:
        with gather_params_ctx([module.get_base_layer().weight], modifier_rank=0):
            W0 = base.weight_to_decompose(module, adapter_name) if rewrite else base.original_weight(module, adapter_name)
            if rewrite and W0 is None:
                raise ValueError(
                    f"The residual of {layer_name or 'this layer'} must be rebuilt from other initial factors, but "
                    f"its base is a quantized {type(module.get_base_layer()).__name__} already holding a residual, "
                    f"which cannot give back the full-precision W0. Load the adapter with "
                    f"load_dude_model(path, adapter_dir, quantization_config=...), or resume with the checkpoint's "
                    f"DuDeConfig (same svd_seed/svd_niter) so that the factors agree."
                )
            if own is None and W0 is not None:
                own = base_fingerprint(W0)
            if fingerprint is not None and own is not None:
                check_fingerprint(layer_name, fingerprint, own, base_hint)
            if rewrite:
                A0, B0 = init_A.to(W0.device), init_B.to(W0.device)
                BA = B0.float() @ A0.float()
                check_init_scaling(module, adapter_name, W0, BA, layer_name)
                base.write_residual(module, W0 - module.scaling[adapter_name] * BA)
                register_init_factors(module, adapter_name, A0, B0)
                install_pretrained_view_(module)
    elif fingerprint is not None:
        check_fingerprint(layer_name, fingerprint, own, base_hint)
    if fingerprint is not None or own is not None:
        store_fingerprint(module, adapter_name, fingerprint if fingerprint is not None else own)


#: How far the config's scaling may be from the one the initial factors imply (randomized SVD and
#: QDuDe's refit move the implied value by well under 1%; an edited alpha or rsLoRA by 2x and more).
SCALING_RTOL = 0.05


def check_init_scaling(module: LoraLayer, adapter_name: str, W0: torch.Tensor, BA: torch.Tensor, layer_name: str) -> None:
    """Raise a `ValueError` when the layer's scaling ``s`` (from ``lora_alpha``, ``r``, ``use_rslora``,
    ``alpha_pattern`` of the adapter config) is not the one its initial factors were made with.

    At initialisation ``s B0 A0`` is the projection of ``W0`` onto its top-r singular subspace, so
    ``<W0, s B0 A0> = ||s B0 A0||^2``: the scaling the factors imply is
    ``<W0, B0 A0> / ||B0 A0||^2`` (`BA` is ``B0 @ A0``, float32). An edited config would otherwise rebuild another residual and
    load silently with other outputs.
    """
    norm_sq = float((BA * BA).sum())
    if norm_sq == 0.0:
        return
    implied = float((W0.float() * BA).sum()) / norm_sq
    scaling = float(module.scaling[adapter_name])
    if abs(scaling - implied) > SCALING_RTOL * abs(implied):
        r, alpha = module.r[adapter_name], module.lora_alpha[adapter_name]
        raise ValueError(
            f"The adapter config gives {layer_name or 'a layer'} the scaling {scaling:.4g} (lora_alpha={alpha}, r={r}, "
            f"use_rslora={module.use_rslora[adapter_name]}), but its initial factors were made for {implied:.4g}: the "
            f"residual W0 - s*B0@A0 would be rebuilt wrong. adapter_config.json was edited after training; restore "
            f"the lora_alpha, r, use_rslora and alpha_pattern it was saved with."
        )


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def _expected_shapes(model: PeftModel, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """Adapter tensors (as PEFT saves them) that the injected layers expect, and their shapes."""
    config = model.peft_config[adapter_name]
    expected: dict[str, tuple[int, ...]] = {}
    for name, module in dude_layers(model, adapter_name):
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


def check_adapter_fits(
    model: PeftModel, weights: dict[str, torch.Tensor], adapter_name: str, source: str, base_hint: str = ""
) -> None:
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
        raise ValueError(
            f"The adapter in {source} does not fit this {type(model.get_base_model()).__name__}: "
            f"{'; '.join(problems)}. It was trained on a different base model or with another r/target_modules; "
            f"load it onto the base it was trained on{base_hint}."
        )




def restore_dude_adapter_(
    model: PeftModel,
    weights: dict[str, torch.Tensor],
    base: FullPrecisionBase,
    adapter_name: str = "default",
    *,
    source: str = "the adapter",
    progress: bool = True,
    trained_on: Optional[str] = None,
) -> PeftModel:
    """Load saved DuDe adapter tensors into freshly injected layers on the *original* base, in place.

    Checks the tensors fit (`check_adapter_fits`), rebuilds each layer's base from the saved
    initial factors after checking it against the saved fingerprint (`rebuild_residual_`, through
    the backend `base`), then loads A, B, the magnitude and the rest through PEFT and installs the
    DuDe forward. `trained_on` is the base the adapter names (its saved ``base_model_name_or_path``,
    which `get_peft_model` overwrites with the base just passed), for error messages.
    """
    config = model.peft_config[adapter_name]
    trained_on = trained_on or config.base_model_name_or_path
    base_hint = f" ({trained_on})" if trained_on else ""
    check_adapter_fits(model, weights, adapter_name, source, base_hint)
    layers = dude_layers(model, adapter_name)
    untie_shared_weights_(model, layers, config)
    unverified = 0
    for name, module in tqdm(layers, desc="DuDe load", disable=not progress or not layers, leave=False):
        fingerprint = weights.get(f"{name}.{FINGERPRINT}")
        unverified += fingerprint is None
        init = (weights[f"{name}.{INIT_A}"], weights[f"{name}.{INIT_B}"]) if config.uses_svd_init else (None, None)
        rebuild_residual_(
            module, adapter_name, *init, base, fingerprint=fingerprint, layer_name=name, base_hint=base_hint
        )
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
    gathered and rewritten from rank 0. On a bitsandbytes base (QDuDe) the base loads quantized as
    at initialisation and each target gets ``q(W0 - s B0 A0)``, computed from the same
    full-precision ``W0`` (the checkpoint's safetensors, else the dequantized weight).

    Args:
        model_or_path: the original base model, or its hub id / local directory.
        adapter_dir: a directory written by `save_pretrained`, `trainer.save_model` or a Trainer checkpoint.
        adapter_name: PEFT adapter name.
        is_trainable: keep the adapter trainable (to continue training); frozen, and in eval mode, otherwise.
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
    quantized_object = not isinstance(model_or_path, str) and is_quantized_model(model_or_path)
    if quantization_config is None and config.base_quantization is not None and not quantized_object:
        raise ValueError(
            f"{source} was trained on a bitsandbytes base ({config.base_quantization}): its residual is that quantized "
            f"matrix, and a full-precision base would give other outputs. {_requantize_hint(config.base_quantization)}"
        )
    tmp = None
    if quantization_config is not None or quantized_object:
        model, checkpoint, checkpoint_kwargs, tmp = load_quantized_base(
            model_or_path, quantization_config, dict(model_kwargs)
        )
    else:
        model, checkpoint, checkpoint_kwargs = load_base_model(model_or_path, **model_kwargs), None, None
    trained_on = config.base_model_name_or_path
    try:
        peft_model = inject_adapter(model, config, adapter_name)
        with base_for(peft_model, checkpoint, checkpoint_kwargs) as base:
            _check_base_quantization(config, base.quantization_record, source)
            base.prepare(peft_model)
            restore_dude_adapter_(
                peft_model, weights, base, adapter_name, source=source, progress=progress, trained_on=trained_on
            )
        # As PEFT's from_pretrained: eval mode unless trainable; then the mode the base came in.
        return peft_model.train(is_trainable and isinstance(model_or_path, nn.Module) and model_or_path.training)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _check_base_quantization(config: DuDeConfig, found: Optional[dict[str, Any]], source: str) -> None:
    """Refuse a base quantized otherwise than the adapter's; note a quantized base under an adapter
    trained in full precision (its residual is quantized now: outputs differ by that error)."""
    if found is None:
        return
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


def _requantize_hint(record: dict[str, Any]) -> str:
    return (
        f"Pass quantization_config=dude_trl.bases.bnb.bnb_config_from_record({record}) (the scheme used in "
        f"training); `python -m dude_trl.export` does this itself."
    )
