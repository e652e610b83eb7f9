"""Export a saved DuDe adapter directory into a folder a serving stack loads as it is.

`export_saved_adapter` loads the adapter on its original base (quantized as it was trained, when
it was), converts it (`convert`), and writes the weights with the tokenizer, the generation
config and a model card (`serving`) through a temporary folder next to the destination, renamed
into place only when complete: a failure midway leaves the destination as it was. The command
line (``python -m dude_trl.export``) and ``python -m dude_trl.lm_eval`` both use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Optional

import torch
from transformers import AutoConfig

from ..bases.bnb import bnb_config_from_record
from ..run_record import eval_settings, in_loop_metrics
from ..saving import load_dude_model, read_dude_config
from .convert import export_merged_model, export_peft_adapter
from .serving import accuracy_row, save_generation_config, save_tokenizer, write_model_card

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("dora", "merged")


class BaseLoadError(OSError):
    """The base model (or its config) could not be loaded: no such model, no weights, no network."""


def base_dtype(base: str, requested: Optional[str]) -> torch.dtype:
    """The dtype to save a merged model in: `requested`, or for ``auto`` the base's own (float32 if unknown)."""
    if requested not in (None, "auto"):
        return DTYPES[requested]
    stored = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored.removeprefix("torch."))
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _replace_dir(src: str, dest: str) -> None:
    """Move the finished folder `src` to `dest`, replacing a `dest` directory only after `src` is in place."""
    if not os.path.lexists(dest):
        os.rename(src, dest)
        return
    parent, name = os.path.split(dest)
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.replace(dest, old)  # POSIX: a directory may replace an empty one
    try:
        os.rename(src, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_into_place(out: str, write: Callable[[str], None]) -> None:
    """Run ``write(folder)`` on a temporary folder next to `out`, then rename it to `out`; on any
    failure the temporary folder is removed and `out` is left as it was."""
    dest = os.path.abspath(out)
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(tmp)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def in_loop_accuracy_row(adapter_dir: str) -> Optional[str]:
    """The card row of the run's last in-loop GSM8K evaluation, if the adapter folder records one."""
    metrics = in_loop_metrics(adapter_dir)
    if metrics is None:
        return None
    settings = eval_settings(adapter_dir)
    data = settings.get("eval_task_dataset") or "the task's default set"
    if settings.get("eval_task_split"):
        data += f" `{settings['eval_task_split']}`"
    return accuracy_row("dude_trl in-loop", str(data), metrics, metrics.get("step"))


def export_saved_adapter(
    adapter: str,
    base: str,
    to: str,
    out: str,
    *,
    adapter_name: str = "default",
    dtype: Optional[str] = None,
    on_quantized_base: Optional[Callable[[dict], None]] = None,
) -> Optional[str]:
    """Write the saved adapter `adapter` (trained on `base`) to `out` as `to`: ``"dora"`` (a vanilla
    PEFT adapter for the unmodified base) or ``"merged"`` (a transformers model, in `dtype`:
    ``auto``/None for the base's own, else a name of `DTYPES`). Next to the weights: the tokenizer
    (the adapter folder's, else the base's), the generation config and ``README.md``.

    Returns the source of the tokenizer written (None: none found). Raises `ValueError` for a
    damaged adapter, a wrong base or an adapter that cannot be exported, `BaseLoadError` when the
    base cannot be loaded, `OSError` when `out` cannot be written; `out` is then left as it was.
    `on_quantized_base(record)` is called before loading when the adapter was trained on a
    bitsandbytes base.
    """
    if to not in KINDS:
        raise ValueError(f"to must be one of {KINDS}, got {to!r}")
    dude_config = read_dude_config(adapter)
    record = dude_config.base_quantization
    quantization_config = None
    if record is not None:
        # The trained model computed with the quantized residual: rebuild exactly that one
        # (merging dequantizes it), instead of silently exporting another model.
        quantization_config = bnb_config_from_record(record)
        if on_quantized_base is not None:
            on_quantized_base(record)
    try:
        model = load_dude_model(
            base, adapter, adapter_name=adapter_name, quantization_config=quantization_config, dtype=torch.float32,
        )
        merged_dtype = base_dtype(base, dtype) if to == "merged" else None
    except OSError as err:  # transformers: no such model / no config / no weights
        raise BaseLoadError(f"cannot load the base model {base!r}: {err}") from err
    row = in_loop_accuracy_row(adapter)
    tokenizer_source: Optional[str] = None

    def write(folder: str) -> None:
        nonlocal tokenizer_source
        if to == "dora":
            export_peft_adapter(model, folder, adapter_name, base_model_name_or_path=base)
            save_generation_config(folder, base)
        else:
            export_merged_model(model, folder, adapter_name, dtype=merged_dtype)
        tokenizer_source = save_tokenizer(folder, [adapter, base])
        write_model_card(
            folder, base=base, config=dude_config, kind="adapter" if to == "dora" else "merged",
            accuracy_rows=[row] if row else [],
        )

    write_into_place(out, write)
    return tokenizer_source
