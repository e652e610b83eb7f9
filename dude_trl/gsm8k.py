"""GSM8K evaluation under its historical names: answer extraction, correctness, ``evaluate``.

The task itself lives in :mod:`dude_trl.eval.gsm8k` and the generic evaluation in
:mod:`dude_trl.eval`; this module keeps ``dude_trl.gsm8k.extract_answer``,
``is_correct``, ``load_gsm8k_eval_dataset`` and ``evaluate(model, tokenizer, dataset, ...)``
working for existing scripts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch

from .eval.gsm8k import (
    DEFAULT_EVAL_SIZE,
    TOLERANCE,
    AnswerCompleteCriteria,
    GSM8KTask,
    build_prompt,
    clean_completion,
    extract_answer,
    is_correct,
    is_correct_flexible,
    last_number,
    load_gsm8k_eval_dataset,
    normalize_number,
    reference_answer,
    strict_answer,
)
from .eval.task import evaluate as evaluate_task
from .eval.task import write_samples_jsonl

__all__ = [
    "DEFAULT_EVAL_SIZE",
    "TOLERANCE",
    "AnswerCompleteCriteria",
    "GSM8KTask",
    "build_prompt",
    "clean_completion",
    "evaluate",
    "extract_answer",
    "is_correct",
    "is_correct_flexible",
    "last_number",
    "load_gsm8k_eval_dataset",
    "normalize_number",
    "reference_answer",
    "strict_answer",
    "write_samples_jsonl",
]


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    num_samples: int | None = None,
    few_shot: int = 0,
    use_chat_template: bool | None = None,
    progress: bool = True,
    num_returned_samples: int = 8,
) -> dict[str, Any]:
    """GSM8K accuracy of ``model`` by batched greedy generation.

    Args:
        model: a transformers causal LM or a ``peft.PeftModel`` wrapping one.
        tokenizer: its tokenizer; padding side and pad token are restored afterwards.
        dataset: rows with ``question``/``answer`` (GSM8K) or ``query``/``response``;
            the reference may be a bare number or a solution ending in ``#### <n>``.
        max_new_tokens: generation budget per question.
        batch_size: prompts per ``generate`` call (per rank).
        num_samples: evaluate only the first ``num_samples`` rows.
        few_shot: prepend this many worked examples from the synthetic train split.
        use_chat_template: None uses the tokenizer's chat template when it has one;
            without a template prompts are ``Question: <q>\\nAnswer:``.
        progress: show a tqdm bar (on rank 0).
        num_returned_samples: how many (question, completion) records to return.

    Returns:
        ``{"accuracy", "accuracy_flexible", "num_samples", "num_correct", "samples"}``;
        ``samples`` holds the first ``num_returned_samples`` rows as dicts with
        ``question``, ``completion``, ``reference``, ``prediction``, ``correct``.

    Generation stops at EOS, when the final-answer line is complete, or after
    ``max_new_tokens``. The model's train/eval mode, ``config.use_cache``, and
    gradient-checkpointing setup are left as they were. Distributed: every rank
    must call this and every rank returns the same global result (see
    :func:`dude_trl.eval.generation.generate`, which keeps ranks in lockstep under
    ZeRO-3).
    """
    result = evaluate_task(
        model, tokenizer, GSM8KTask(few_shot=few_shot), dataset,
        max_new_tokens=max_new_tokens, batch_size=batch_size, num_samples=num_samples,
        use_chat_template=use_chat_template, progress=progress, num_returned_samples=num_returned_samples,
    )
    metrics = result["metrics"]
    return {
        "accuracy": metrics["accuracy"],
        "accuracy_flexible": metrics["accuracy_flexible"],
        "num_samples": metrics["num_samples"],
        "num_correct": sum(score["accuracy"] for score in result["scores"]),
        "samples": result["samples"],
    }
