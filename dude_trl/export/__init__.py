"""Every way out of a DuDe run: a vanilla PEFT adapter for the unmodified base (`convert`), or a
merged transformers model; ``python -m dude_trl.export`` is the command line (`__main__`)."""

from .convert import (
    dora_adapter_state_dict,
    export_dora_adapter,
    export_merged_model,
    export_peft_adapter,
    merge_to_base,
    peft_adapter_state_dict,
)

__all__ = [
    "dora_adapter_state_dict",
    "export_dora_adapter",
    "export_merged_model",
    "export_peft_adapter",
    "merge_to_base",
    "peft_adapter_state_dict",
]
