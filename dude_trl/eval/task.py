"""What an evaluation task supplies, and the evaluation that runs any task.

A task (``EvalTask``) says what to ask (``prompt``), when an answer is finished
(``stopping_criteria``), how to read and grade it (``clean``, ``score``) and what
to keep of each row for inspection (``sample``). ``evaluate`` turns a dataset into
prompts, generates with :func:`dude_trl.eval.generation.generate`, and averages
the per-row scores into metrics that are logged as ``<task.name>/<metric>``.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from transformers import StoppingCriteria

from .generation import generate


class EvalTask(ABC):
    """One evaluation task: its data, prompts, stopping rule and scoring.

    Subclasses set the class attributes and implement ``prompt`` and ``score``;
    the other methods have defaults that suit a task without special needs.

    Attributes:
        name: metric prefix (``<name>/<metric>``) and samples file stem
            (``<name>_samples_step<N>.jsonl``).
        metrics: the keys ``score`` returns; each is averaged over the rows.
        max_new_tokens: generation budget per row when the caller gives none.
    """

    name: str
    metrics: tuple[str, ...]
    max_new_tokens: int = 256

    def load(
        self, name_or_path: str | None = None, num_samples: int | None = None, split: str | None = None
    ) -> Sequence[Any]:
        """The task's evaluation data (its default set for None); tasks without one need a dataset."""
        raise NotImplementedError(f"task {self.name!r} has no default data; pass a dataset")

    def rows(self, dataset: Iterable[Any]) -> list[Any]:
        """The rows of ``dataset`` in the form ``prompt`` and ``score`` take.

        Raises ValueError for data the task cannot read. Default: the rows as they are.
        """
        return list(dataset)

    def question(self, row: Any) -> str | None:
        """The question text of a row, compared with the training data to refuse overlap (None: not checked)."""
        return None

    @abstractmethod
    def prompt(self, row: Any, tokenizer: Any, use_chat_template: bool) -> str:
        """Prompt text for one row; with ``use_chat_template`` rendered by the tokenizer's template."""

    def stopping_criteria(self, tokenizer: Any, prompt_length: int) -> list[StoppingCriteria]:
        """Criteria ending a sequence early, for a batch whose padded prompts are ``prompt_length`` long.

        EOS and the token budget always stop generation. Default: none besides those.
        """
        return []

    def clean(self, completion: str) -> str:
        """The completion as scored and kept (e.g. cut where the model moves on). Default: unchanged."""
        return completion

    @abstractmethod
    def score(self, completion: str, row: Any) -> dict[str, float]:
        """Per-row value of each of ``metrics`` (a bool counts as 0 or 1)."""

    def sample(self, row: Any, completion: str, scores: Mapping[str, float]) -> dict[str, Any]:
        """The record kept for inspection (samples file, W&B table). Default: completion and scores."""
        return {"completion": completion, **scores}


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    task: EvalTask,
    dataset: Iterable[Any],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    num_samples: int | None = None,
    use_chat_template: bool | None = None,
    progress: bool = True,
    num_returned_samples: int | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``task`` by batched greedy generation.

    Args:
        model: a transformers causal LM or a ``peft.PeftModel`` wrapping one.
        tokenizer: its tokenizer; padding side and pad token are restored afterwards.
        task: what to ask and how to score it.
        dataset: the task's evaluation data (anything ``task.rows`` reads).
        max_new_tokens: generation budget per row; None uses ``task.max_new_tokens``.
        batch_size: prompts per ``generate`` call (per rank).
        num_samples: evaluate only the first ``num_samples`` rows.
        use_chat_template: None uses the tokenizer's chat template when it has one.
        progress: show a tqdm bar (on rank 0).
        num_returned_samples: how many sample records to return (None: all).

    Returns:
        ``{"metrics", "scores", "samples"}``: ``metrics`` maps each of
        ``task.metrics`` to its mean over the rows (0.0 without rows) plus
        ``num_samples``; ``scores`` holds every row's ``task.score``, in order;
        ``samples`` the ``task.sample`` records, each with its ``prompt``, of the first
        ``num_returned_samples`` rows.

    Distributed: every rank must call this, with the same data (see
    :func:`dude_trl.eval.generation.generate`); every rank returns the same result.
    """
    rows = task.rows(dataset)
    if num_samples is not None:
        rows = rows[:num_samples]
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    elif use_chat_template and not has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")

    prompts = [task.prompt(row, tokenizer, use_chat_template) for row in rows]
    generated = generate(
        model, tokenizer, prompts,
        max_new_tokens=task.max_new_tokens if max_new_tokens is None else max_new_tokens,
        batch_size=batch_size, stopping=partial(task.stopping_criteria, tokenizer),
        # A rendered chat template already holds BOS; plain prompts get the tokenizer's own.
        add_special_tokens=not use_chat_template, progress=progress, desc=f"{task.name} eval",
    )
    completions = [task.clean(text) for text in generated]
    scores = [task.score(completion, row) for completion, row in zip(completions, rows)]

    metrics: dict[str, float] = {
        key: sum(score[key] for score in scores) / len(scores) if scores else 0.0 for key in task.metrics
    }
    metrics["num_samples"] = len(rows)
    kept = rows if num_returned_samples is None else rows[:max(num_returned_samples, 0)]
    samples = [
        {"prompt": prompt, **task.sample(row, completion, score)}
        for row, prompt, completion, score in zip(kept, prompts, completions, scores)
    ]
    return {"metrics": metrics, "scores": scores, "samples": samples}


def write_samples_jsonl(samples: Sequence[Mapping[str, Any]], path: str) -> None:
    """Write sample records one JSON object per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
