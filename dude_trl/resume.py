"""Resuming DuDe training runs exactly, and skipping checkpoints a crash left half-written.

``trainer.train(resume_from_checkpoint=...)`` restores A, B, the magnitude, the optimizer, the
scheduler and the data order, but not the frozen residual: a fresh process has drawn its own
(randomized) SVD. `prepare_dude_resume` first rebuilds the residual the checkpoint was trained
against from the initial factors saved in it (`dude_trl.saving.rebuild_residual_`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from typing import Any, Optional, Union

from peft import PeftModel

from .bases import base_for
from .config import DuDeConfig
from .layers import FINGERPRINT, INIT_A, INIT_B, dude_layers
from .norms import invalidate_norm_caches
from .run_record import TRAINER_STATE_NAME
from .saving import (
    SAFE_WEIGHTS_NAME,
    check_adapter_fits,
    read_adapter_weights,
    read_dude_config,
    rebuild_residual_,
    safetensors_problem,
)

logger = logging.getLogger(__name__)

# Fields that fix the adapter's shapes and scalings: a checkpoint and the trainer resuming it must agree.
_STRUCTURAL_FIELDS = ("method", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
# Fields that only say how the initial factors were drawn; a resumed run takes the checkpoint's.
_INIT_FIELDS = ("svd_niter", "svd_oversample", "svd_seed", "quant_iters")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Files `torch.save` writes in a checkpoint (optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin,
# DeepSpeed's global_step*/..._states.pt): zip archives, whose central directory is written last.
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_ZIP_MAGIC = b"PK\x03\x04"


def checkpoint_problem(checkpoint_dir: Union[str, os.PathLike]) -> Optional[str]:
    """Why `checkpoint_dir` is not a complete Trainer checkpoint, or None when it is.

    Trainer writes ``trainer_state.json`` last, after the model, optimizer, scheduler and RNG
    states, so a run killed while saving leaves a checkpoint without it (or with a truncated one).
    A file cut short anyway (a full disk, an interrupted copy) is found too: every ``.safetensors``
    file by its header, every `torch.save` file (``optimizer.pt``, ``scheduler.pt``, ...) by its
    zip directory (`torch_file_problem`); the answer names the file.
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
    for path in _checkpoint_files(checkpoint_dir):
        name = os.path.relpath(path, checkpoint_dir)
        if path.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem is not None:
                return f"{name} is damaged ({problem})"
        elif path.endswith(_TORCH_SUFFIXES):
            problem = torch_file_problem(path)
            if problem is not None:
                return f"{name} is damaged ({problem})"
    return None


def _checkpoint_files(checkpoint_dir: str) -> list[str]:
    """Every file under `checkpoint_dir` (sub-directories too: other adapters, DeepSpeed states),
    the adapter weights first."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(checkpoint_dir) for name in names)
    return sorted(paths, key=lambda path: os.path.basename(path) != SAFE_WEIGHTS_NAME)


def torch_file_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why the `torch.save` file `path` is unreadable (empty, or a zip archive cut short), or None.

    Opening it with `zipfile` reads only the end of the file, where the archive's central
    directory lies (written last, so a save that did not finish has none), and that directory:
    cheap for a multi-GB optimizer state. A file in torch's legacy (non-zip) format is not checked.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size and f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return None
        if size == 0:
            return "0 bytes: torch.load would fail on it"
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError) as err:
        return (
            f"{size} bytes and no zip central directory, which torch.save writes last: cut short, torch.load "
            f"would fail on it ({err})"
        )
    except OSError as err:
        return f"unreadable ({err})"
    data_end = max((entry.header_offset + entry.compress_size for entry in entries), default=0)
    if data_end > size:
        return f"{size} bytes where its zip directory describes at least {data_end}: cut short"
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
            f"dude_trl.saving.read_dude_config({checkpoint_dir!r})."
        )
    weights = read_adapter_weights(checkpoint_dir)
    check_adapter_fits(model, weights, adapter_name, checkpoint_dir)
    base_hint = f" ({saved.base_model_name_or_path})" if saved.base_model_name_or_path else ""
    with base_for(model) as base:
        for name, module in dude_layers(model, adapter_name):
            init = (weights[f"{name}.{INIT_A}"], weights[f"{name}.{INIT_B}"]) if saved.uses_svd_init else (None, None)
            rebuild_residual_(
                module, adapter_name, *init, base, fingerprint=weights.get(f"{name}.{FINGERPRINT}"), layer_name=name,
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

