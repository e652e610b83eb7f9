"""`DuDeSFTConfig`: TRL's `SFTConfig` plus the settings `DuDeSFTTrainer` adds.

As with `SFTConfig`, every field is a command-line flag and a YAML key through `TrlParser`
(``--log_grad_norms false``, ``--eval_task gsm8k --eval_task_num_samples 64``). The adapter
itself is configured by `DuDeConfig`, as PEFT's `LoraConfig` is in TRL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from trl import SFTConfig

from .eval import TASKS

logger = logging.getLogger(__name__)


def _trains_on_cpu(use_cpu: bool) -> bool:
    if use_cpu:
        return True
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return accelerator is None and not torch.cuda.is_available()


@dataclass
class DuDeSFTConfig(SFTConfig):
    """`trl.SFTConfig` with gradient-norm logging and in-loop generation evaluation.

    Args:
        log_grad_norms: log ``grad_norm/total`` and per-group norms (``grad_norm/magnitude``,
            ``grad_norm/lora_A``, ``grad_norm/lora_B``) on every optimizer step.
        eval_task: an evaluation task run inside the training loop by greedy generation
            (``"gsm8k"``; see `dude_trl.eval.TASKS`), logged as ``<task>/<metric>``; None: none.
        eval_task_dataset: its data: a hub id, a local JSON/JSONL file in the task's format or a
            synthetic set (``synthetic``, ``curriculum``); None: the task's default set.
        eval_task_split: the split of `eval_task_dataset`, slices included (``train[-500:]``, the
            offline GSM8K dev slice of the train file); None: the task's default.
        eval_task_num_samples: problems per evaluation (None: all of `eval_task_dataset`, or the
            task's default number).
        eval_task_steps: evaluate every this many optimizer steps (and once at the end).
        eval_task_on_start: also evaluate before the first step.
        eval_task_max_new_tokens: generation budget per problem (None: the task's default).
        eval_task_batch_size: problems generated together.
    """

    log_grad_norms: bool = field(
        default=True, metadata={"help": "Log grad_norm/total and per-group norms on every optimizer step."}
    )
    eval_task: Optional[str] = field(
        default=None, metadata={"help": f"In-loop generation evaluation task: one of {sorted(TASKS)}, or None."}
    )
    eval_task_dataset: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local JSON/JSONL of the eval task's data (None: its default)."}
    )
    eval_task_split: Optional[str] = field(
        default=None, metadata={"help": "Split of eval_task_dataset, slices included, e.g. 'train[-500:]'."}
    )
    eval_task_num_samples: Optional[int] = field(default=None, metadata={"help": "Problems per evaluation."})
    eval_task_steps: int = field(default=200, metadata={"help": "Evaluate every N optimizer steps."})
    eval_task_on_start: bool = field(default=False, metadata={"help": "Also evaluate before training."})
    eval_task_max_new_tokens: Optional[int] = field(
        default=None, metadata={"help": "Generation budget per problem (None: the task's default)."}
    )
    eval_task_batch_size: int = field(default=16, metadata={"help": "Generation batch size."})
    # TRL defaults `gradient_checkpointing` to True, and transformers 5 warns on that old name of
    # `activation_checkpointing`; TRL's default is carried by the new name, so only a config that
    # sets the old name itself gets transformers' notice.
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "Old name of activation_checkpointing (transformers 5); default: on."}
    )

    def __post_init__(self) -> None:
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        if self.bf16 is None and not self.fp16 and _trains_on_cpu(self.use_cpu):
            logger.info("Training on a CPU: bf16 autocast off (float32); pass bf16=True to use it.")
            self.bf16 = False
        if self.eval_task is not None and self.eval_task not in TASKS:
            raise ValueError(f"eval_task={self.eval_task!r} is not a known task; choose one of {sorted(TASKS)}.")
        for name in ("eval_task_steps", "eval_task_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        for name in ("eval_task_num_samples", "eval_task_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer or None, got {value}.")
        super().__post_init__()
