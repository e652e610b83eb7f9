"""`DuDeSFTTrainer`: `trl.SFTTrainer` that understands a `DuDeConfig`.

TRL applies PEFT inline in `SFTTrainer.__init__` (`get_peft_model(model, peft_config)`).
A `DuDeConfig` is a `LoraConfig`, so TRL builds PEFT's LoRA/DoRA layers itself, with all its
PEFT handling (ZeRO-3 adapter dtype, input grads under gradient checkpointing, k-bit
preparation); this subclass then initialises those layers in place with `initialize_dude_`.
With a plain `LoraConfig`, another `PeftConfig` or none, nothing differs from `SFTTrainer`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from trl import SFTTrainer

from .bases.bnb import validate_quantization_config
from .callbacks import GradNormCallback
from .config import DuDeConfig
from .model import initialize_dude_
from .resume import prepare_dude_resume


class DuDeSFTTrainer(SFTTrainer):
    """Drop-in replacement for `trl.SFTTrainer`; pass its arguments by keyword.

    Args:
        peft_config: a `DuDeConfig` for DuDe and its baselines; anything else is handed to
            `SFTTrainer` unchanged.
        log_grad_norms: log ``grad_norm/total`` and per-group norms (``grad_norm/magnitude``,
            ``grad_norm/lora_A``, ``grad_norm/lora_B``) on every optimizer step.
        *args, **kwargs: exactly `trl.SFTTrainer`'s.
    """

    def __init__(self, *args: Any, peft_config: Any = None, log_grad_norms: bool = True, **kwargs: Any) -> None:
        is_dude = isinstance(peft_config, DuDeConfig)
        if is_dude and kwargs.get("quantization_config") is not None:
            # Refuse GPTQ/AWQ/... before TRL loads anything.
            kwargs["quantization_config"] = validate_quantization_config(kwargs["quantization_config"])
        super().__init__(*args, peft_config=peft_config, **kwargs)
        if is_dude:
            # TRL loaded (and, with a quantization_config, quantized) the base itself; a quantized
            # base reads W0 back from the checkpoint it came from.
            model = kwargs.get("model", args[0] if args else None)
            initialize_dude_(
                self.model,
                "default",
                progress=self.is_world_process_zero(),
                checkpoint=model if isinstance(model, str) else None,
                checkpoint_kwargs=self.args.model_init_kwargs,
            )
        if log_grad_norms:
            GradNormCallback.ensure_attached(self)

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; when resuming a DuDe run, first rebuild the checkpoint's exact residual
        (a fresh process may have drawn another randomized SVD) and skip half-written checkpoints."""
        return super().train(prepare_dude_resume(self, resume_from_checkpoint), *args, **kwargs)
