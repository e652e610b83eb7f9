"""Build a DuDe `PeftModel`: PEFT injects the LoRA/DoRA layers, this module initialises them.

`get_peft_model` with a `DuDeConfig` (a `LoraConfig` whose `use_dora` follows `method`)
creates PEFT's own layers with Kaiming/zero factors and, for the magnitude methods, the
magnitude ``||W0||_row``. `initialize_dude_` then picks the base backend once
(`dude_trl.bases`: full precision or bitsandbytes) and, layer by layer (`dude_trl.layer_init`,
shared between the processes of a distributed run by `dude_trl.distributed`):

1. takes the top-r SVD of ``W0`` (SVD methods) and writes the split factors into A, B;
2. replaces the frozen base weight by the residual ``W0 - s B A`` (quantized on a bnb base);
3. records the initial A, B and a fingerprint of ``W0`` as buffers saved with the adapter, so
   the exact residual can be rebuilt from the original base whatever the RNG state;
4. sets the magnitude to the row norm of ``W_res + s B A`` as stored;
5. installs `DuDeLinearVariant` (the fast forward) on the magnitude methods.

The same function runs after `trl.SFTTrainer` applied PEFT itself, which keeps all of TRL's
PEFT handling (ZeRO-3 adapter dtype, input grads for checkpointing, k-bit preparation).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from .bases import base_for
from .bases.bnb import is_quantized_model, load_quantized_base
from .bases.full import load_base_model
from .config import DuDeConfig
from .distributed import svd_init_layers_
from .layer_init import record_base_fingerprints_
from .layers import check_dude_layers, dude_layers, inject_adapter, install_dude_variant_, untie_shared_weights_
from .norms import invalidate_norm_caches
from .saving import load_dude_model


def initialize_dude_(
    model: nn.Module,
    adapter_name: str = "default",
    progress: bool = True,
    checkpoint: Optional[str] = None,
    checkpoint_kwargs: Optional[dict] = None,
) -> nn.Module:
    """Turn the freshly injected PEFT LoRA/DoRA layers of `model` into DuDe layers, in place.

    `model` is a `PeftModel` whose `peft_config[adapter_name]` is a `DuDeConfig`. Idempotent
    for the variant swap; the SVD initialisation must run exactly once per adapter.

    In a distributed run (DDP, ZeRO-2, ZeRO-3) every process must call this on the same
    model: the SVDs are shared between the processes and the results broadcast, so all of
    them end with identical values (`dude_trl.distributed`). `progress` shows a bar on rank 0.

    On a bitsandbytes base, each target's full-precision ``W0`` is read from `checkpoint` (the
    path or hub id the base was loaded from; `checkpoint_kwargs` are its `from_pretrained`
    kwargs) when it has safetensors, else the dequantized weight stands in (logged: less accurate).
    """
    config = model.peft_config[adapter_name]
    if not isinstance(config, DuDeConfig):
        raise TypeError(f"initialize_dude_ needs a DuDeConfig, got {type(config).__name__}.")
    with base_for(model, checkpoint, checkpoint_kwargs) as base:
        base.prepare(model)
        layers = dude_layers(model, adapter_name)
        check_dude_layers(layers, adapter_name, config)
        untie_shared_weights_(model, layers, config)
        if config.uses_svd_init:
            svd_init_layers_(layers, adapter_name, config, base, progress=progress)
            base.log_summary()
        install_dude_variant_(model, adapter_name)
        if base.quantization_record is not None:
            config.base_quantization = base.quantization_record
        record_base_fingerprints_(model, adapter_name, base)
    invalidate_norm_caches(model)
    return model


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
        model_or_path: a transformers model, or a hub id / local directory to load one from. A
            bitsandbytes-quantized model, or a `quantization_config`, gives QDuDe: a path is
            loaded quantized with W0 read from its safetensors; a full-precision model object is
            quantized through a temporary save; an already-quantized model is decomposed from
            its dequantized weights.
        config: the adapter configuration, or the directory of a saved DuDe adapter to reload onto
            the original base (residual rebuilt exactly from its initial factors, see
            `dude_trl.saving.load_dude_model`).
        quantization_config: a `transformers.BitsAndBytesConfig` for a 4-bit/8-bit base.
        adapter_name: PEFT adapter name.
        progress: show a progress bar over the layers being decomposed.
        is_trainable: for a saved adapter only: keep it trainable (frozen by default, as in PEFT).
        **model_kwargs: passed to `from_pretrained` when a path is given (e.g. ``dtype``,
            ``device_map``, ``revision``).

    The result is in the train/eval mode the base model was in (eval for a path, as
    `from_pretrained` loads), every module alike; `Trainer` switches it to train mode itself.
    """
    if isinstance(config, (str, os.PathLike)):
        return load_dude_model(
            model_or_path, config, adapter_name=adapter_name, is_trainable=is_trainable,
            quantization_config=quantization_config, progress=progress, **model_kwargs,
        )
    if not isinstance(config, DuDeConfig):
        raise TypeError(f"get_dude_model needs a DuDeConfig, got {type(config).__name__}; wrap your LoraConfig fields.")
    training = isinstance(model_or_path, nn.Module) and model_or_path.training
    quantized_object = not isinstance(model_or_path, str) and is_quantized_model(model_or_path)
    if quantization_config is None and not quantized_object:
        model = load_base_model(model_or_path, **model_kwargs)
        peft_model = initialize_dude_(inject_adapter(model, config, adapter_name), adapter_name, progress=progress)
        return peft_model.train(training)
    model, checkpoint, checkpoint_kwargs, tmp = load_quantized_base(model_or_path, quantization_config, model_kwargs)
    try:
        peft_model = inject_adapter(model, config, adapter_name)
        return initialize_dude_(peft_model, adapter_name, progress, checkpoint, checkpoint_kwargs).train(training)
    finally:
        if tmp is not None:
            tmp.cleanup()
