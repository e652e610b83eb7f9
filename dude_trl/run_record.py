"""What a training run left on disk about its evaluation: the in-loop accuracy, its settings and samples.

A run directory (``output_dir``) or one of its ``checkpoint-N`` folders holds the adapter,
``trainer_state.json`` (``global_step`` and ``log_history``, where the in-loop evaluation logs
``<task>/accuracy``), ``eval_settings.json`` (the `DuDeSFTConfig`'s ``eval_task_*`` settings,
written by `DuDeSFTTrainer`) and, in the run directory, ``<task>_samples_step<N>.jsonl`` (every row scored at step
N). The export's model card and ``python -m dude_trl.lm_eval`` read them from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

TRAINER_STATE_NAME = "trainer_state.json"
EVAL_SETTINGS_NAME = "eval_settings.json"
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


def write_eval_settings(folder: PathLike, args: Any) -> None:
    """Write the ``eval_task_*`` fields of `args` (a `DuDeSFTConfig`) to ``folder/EVAL_SETTINGS_NAME``,
    as JSON: readers then never have to unpickle ``training_args.bin``."""
    values = {name: getattr(args, name) for name in EVAL_SETTINGS if hasattr(args, name)}
    (Path(folder) / EVAL_SETTINGS_NAME).write_text(json.dumps(values, indent=2))


def eval_settings(adapter_dir: PathLike) -> dict[str, Any]:
    """The run's ``eval_task_*`` settings saved with the adapter (empty when there are none).

    `DuDeSFTTrainer` writes them next to every save (`write_eval_settings`). The pickled
    ``training_args.bin`` beside them is deliberately not read: unpickling a downloaded
    checkpoint's file would run whatever code it holds.
    """
    try:
        values = json.loads((Path(adapter_dir) / EVAL_SETTINGS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return {name: values[name] for name in EVAL_SETTINGS if name in values}


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
