"""In-training GSM8K evaluation: ``EvalCallback`` with the GSM8K task and its arguments."""

from __future__ import annotations

from typing import Any

import datasets

from ..eval.gsm8k import GSM8KTask
from .eval import EvalCallback


class GSM8KEvalCallback(EvalCallback):
    """Evaluates GSM8K during training; logs ``gsm8k/accuracy``, ``gsm8k/accuracy_flexible``, ``gsm8k/num_samples``.

    Behaves as :class:`EvalCallback` with a :class:`dude_trl.eval.gsm8k.GSM8KTask`:
    samples go to ``<output_dir>/gsm8k_samples_step<N>.jsonl``.

    Args:
        dataset: GSM8K-schema evaluation data, or a name/path for
            :func:`dude_trl.eval.gsm8k.load_gsm8k_eval_dataset` (None: synthetic test split).
        eval_steps: evaluate every this many optimizer steps.
        max_new_tokens, batch_size, num_samples, use_chat_template: passed to
            :func:`dude_trl.eval.task.evaluate`.
        eval_on_start: also evaluate before the first step.
        num_logged_samples: sample completions written/logged per evaluation (None: all).
        tokenizer: overrides the trainer's ``processing_class``.
        few_shot: prepend this many worked examples (synthetic train split) to each prompt.
    """

    def __init__(
        self,
        dataset: datasets.Dataset | str | None = None,
        *,
        eval_steps: int = 200,
        max_new_tokens: int = 256,
        batch_size: int = 16,
        num_samples: int | None = None,
        eval_on_start: bool = False,
        num_logged_samples: int | None = None,
        tokenizer: Any = None,
        few_shot: int = 0,
        use_chat_template: bool | None = None,
    ):
        super().__init__(
            GSM8KTask(few_shot=few_shot), dataset, eval_steps=eval_steps, max_new_tokens=max_new_tokens,
            batch_size=batch_size, num_samples=num_samples, eval_on_start=eval_on_start,
            num_logged_samples=num_logged_samples, tokenizer=tokenizer, use_chat_template=use_chat_template,
        )
        self.few_shot = few_shot
