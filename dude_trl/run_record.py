"""What a training run left on disk about its evaluation: the in-loop accuracy, its settings and samples.

A run directory (``output_dir``) or one of its ``checkpoint-N`` folders holds the adapter,
``trainer_state.json`` (``global_step`` and ``log_history``, where the in-loop evaluation logs
``<task>/accuracy``), ``training_args.bin`` (the `DuDeSFTConfig`, with the ``eval_task_*``
settings) and, in the run directory, ``<task>_samples_step<N>.jsonl`` (every row scored at step
N). The export's model card and ``python -m dude_trl.lm_eval`` read them from here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.bin"
PathLike = Union[str, os.PathLike]

#: The ``eval_task_*`` fields of `DuDeSFTConfig` that say how the in-loop evaluation ran.
EVAL_SETTINGS = (
    "eval_task", "eval_task_dataset", "eval_task_split", "eval_task_num_samples", "eval_task_max_new_tokens",
    "eval_task_batch_size",
)


def trainer_state(adapter_dir: PathLike) -> Optional[dict[str, Any]]:
    """The ``trainer_state.json`` saved with the adapter (None when there is none or it is unreadable)."""
    path = Path(adapter_dir) / TRAINER_STATE_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def in_loop_metrics(adapter_dir: PathLike, task: str = "gsm8k") -> Optional[dict[str, Any]]:
    """The last in-loop evaluation logged before the adapter was saved: ``{"step", "accuracy",
    "accuracy_flexible", "num_samples"}`` (the keys the task logged), or None."""
    state = trainer_state(adapter_dir)
    rows = [row for row in (state or {}).get("log_history", []) if f"{task}/accuracy" in row]
    if not rows:
        return None
    prefix = f"{task}/"
    last = rows[-1]
    return {"step": last.get("step"), **{k[len(prefix):]: v for k, v in last.items() if k.startswith(prefix)}}


def eval_settings(adapter_dir: PathLike) -> dict[str, Any]:
    """The run's ``eval_task_*`` settings from ``training_args.bin`` (empty when absent or unreadable).

    The file is the pickled training arguments the Trainer writes next to every checkpoint; it is
    read with ``weights_only=False`` because it holds a dataclass, so only read your own runs'.
    """
    path = Path(adapter_dir) / TRAINING_ARGS_NAME
    if not path.is_file():
        return {}
    try:
        args = torch.load(path, weights_only=False)
    except Exception as err:  # a pickle of another version's classes can fail in many ways
        logger.info("Could not read %s (%s); the run's evaluation settings are unknown.", path, err)
        return {}
    return {name: getattr(args, name) for name in EVAL_SETTINGS if hasattr(args, name)}


def in_loop_samples_path(adapter_dir: PathLike, step: int, task: str = "gsm8k") -> Optional[Path]:
    """``<task>_samples_step<step>.jsonl`` in the adapter's folder or, for a checkpoint, its run directory."""
    folder = Path(adapter_dir)
    for candidate in (folder, folder.resolve().parent):
        path = candidate / f"{task}_samples_step{step}.jsonl"
        if path.is_file():
            return path
    return None


def read_samples(path: PathLike) -> list[dict[str, Any]]:
    """The records of a samples file, one JSON object per line."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
