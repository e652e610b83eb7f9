"""Base backends: what DuDe does differently for each kind of frozen base, chosen once per model.

- `full.FullPrecisionBase`: float32/bf16/fp16 weights (ZeRO-3 partitioned or not); the interface.
- `bnb.BitsAndBytesBase`: bitsandbytes 4-bit/8-bit layers (QDuDe).

A new quantization backend is one module with a `FullPrecisionBase` subclass and a branch in
`base_for`.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .bnb import BitsAndBytesBase, is_quantized_model
from .full import FullPrecisionBase


def base_for(
    model: nn.Module, checkpoint: Optional[str] = None, checkpoint_kwargs: Optional[dict] = None
) -> FullPrecisionBase:
    """The backend for `model`'s base (a transformers or PEFT model). `checkpoint` (the path or
    hub id the base was loaded from) and `checkpoint_kwargs` let a quantized backend read the
    full-precision weights; a full-precision base needs neither. Refuses quantization schemes
    DuDe cannot decompose (GPTQ, AWQ, ...) with a `ValueError` naming the fix."""
    if is_quantized_model(model):
        return BitsAndBytesBase(model, checkpoint, checkpoint_kwargs)
    return FullPrecisionBase()


__all__ = ["BitsAndBytesBase", "FullPrecisionBase", "base_for"]
