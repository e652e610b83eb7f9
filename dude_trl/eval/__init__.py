"""Pluggable evaluation: a task protocol, a generic greedy-generation evaluation, and GSM8K as one task.

    from dude_trl.eval import GSM8KTask, evaluate
    result = evaluate(model, tokenizer, GSM8KTask(), dataset)   # result["metrics"]["accuracy"]
"""

from .generation import generate
from .gsm8k import GSM8KTask
from .task import EvalTask, evaluate, write_samples_jsonl

#: Tasks reachable by name (``DuDeSFTConfig(eval_task=...)``, ``--eval_task``); a new task is one entry.
TASKS: dict[str, type[EvalTask]] = {GSM8KTask.name: GSM8KTask}

__all__ = ["TASKS", "EvalTask", "GSM8KTask", "evaluate", "generate", "write_samples_jsonl"]
