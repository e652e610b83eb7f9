"""dude_trl: DuDe fine-tuning (DoRA's magnitude/direction split, SVD-initialised as in PiSSA) on PEFT and TRL.

Names are imported on first use, so command-line tools such as `python -m dude_trl.plan`
start without loading TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DuDeConfig": "config",
    "get_dude_model": "model",
    "initialize_dude_": "model",
    "load_dude_model": "saving",
    "export_peft_adapter": "export",
    "export_dora_adapter": "export",
    "DuDeSFTTrainer": "trainer",
    "DuDeSFTConfig": "sft_config",
    "EvalCallback": "callbacks",
    "GradNormCallback": "callbacks",
    "GSM8KEvalCallback": "callbacks",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .callbacks import EvalCallback, GradNormCallback, GSM8KEvalCallback
    from .config import DuDeConfig
    from .export import export_dora_adapter, export_peft_adapter
    from .model import get_dude_model, initialize_dude_
    from .saving import load_dude_model
    from .sft_config import DuDeSFTConfig
    from .trainer import DuDeSFTTrainer


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dude_trl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
