"""Scoring exported adapters with lm-evaluation-harness, and checking it agrees with the in-loop evaluator.

    python -m dude_trl.lm_eval RUN_OR_ADAPTER_DIR [--tasks gsm8k_local] [--data FILE.jsonl] [--limit N] [--merged]

`harness` runs lm-eval (an optional dependency: ``pip install 'dude_trl[eval]'``) on a model or a
vanilla PEFT adapter with the GSM8K tasks shipped in ``tasks/``; `agreement` compares its
per-problem results with the in-loop evaluator's samples; ``__main__`` is the command line.
"""

from .agreement import compare, summary
from .harness import LOCAL_TASKS, TASKS_DIR, LmEvalMissing, problem_records, run_lm_eval

__all__ = ["LOCAL_TASKS", "TASKS_DIR", "LmEvalMissing", "compare", "problem_records", "run_lm_eval", "summary"]
