"""lm-evaluation-harness on a model or a vanilla PEFT adapter, offline, with the tasks the package ships.

``tasks/gsm8k_local.yaml`` (chat models) and ``tasks/gsm8k_local_plain.yaml`` ask GSM8K as the
in-loop evaluator does and read each completion as it does (``tasks/utils.py``); their data is a
local GSM8K-format file, which `local_task_dir` points them at. Any other lm-eval task (the stock
``gsm8k``, ``mmlu``, ``arc_challenge``, ...) runs unchanged, from the hub.

lm-eval is an optional dependency (``pip install 'dude_trl[eval]'``), imported when a run starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from ..eval.gsm8k import last_number, reference_answer, strict_answer
from ..layers import peft_deprecations_silenced
from .tasks.utils import in_loop_completion

TASKS_DIR = Path(__file__).with_name("tasks")
#: The shipped tasks: asked through the tokenizer's chat template, and with plain prompts.
LOCAL_TASKS = ("gsm8k_local", "gsm8k_local_plain")
LM_EVAL_VERSION = "0.4.13"
INSTALL_HINT = "pip install 'dude_trl[eval]'"


class LmEvalMissing(ImportError):
    """lm-evaluation-harness is not installed."""


def local_task_for(task: str, use_chat_template: bool) -> str:
    """`task`, with ``gsm8k_local`` swapped for ``gsm8k_local_plain`` when prompts are plain."""
    return "gsm8k_local_plain" if task == "gsm8k_local" and not use_chat_template else task


def local_task_dir(folder: str, data_file: str) -> str:
    """Write into `folder` one task file per shipped task, each the shipped one reading `data_file`."""
    os.makedirs(folder, exist_ok=True)
    for name in LOCAL_TASKS:
        config = {
            "include": str(TASKS_DIR / f"{name}.yaml"),
            "task": name,
            "dataset_kwargs": {"data_files": {"test": os.path.abspath(data_file)}},
        }
        with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
    return folder


def write_problems(rows: Sequence[tuple[str, Any]], path: str) -> str:
    """Write (question, reference) pairs as the GSM8K-format jsonl the shipped tasks read."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for question, answer in rows:
            handle.write(json.dumps({"question": question, "answer": str(answer)}, ensure_ascii=False) + "\n")
    return path


def run_lm_eval(
    *,
    pretrained: str,
    tasks: Sequence[str],
    peft: Optional[str] = None,
    tokenizer: Optional[str] = None,
    data_file: Optional[str] = None,
    work_dir: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "float32",
    max_gen_toks: Optional[int] = None,
    apply_chat_template: bool = False,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` with the ``hf`` model on `pretrained` (plus the `peft` adapter),
    greedy, with per-sample logs. The shipped tasks read `data_file` (their task files are written
    under `work_dir`). Returns lm-eval's results dict, ``samples`` included.

    Raises `LmEvalMissing` without lm-eval, `ValueError` for a shipped task without `data_file`.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise LmEvalMissing(f"lm-evaluation-harness is not installed ({err}); {INSTALL_HINT}") from err
    include_path = None
    if any(task in LOCAL_TASKS for task in tasks):
        if data_file is None or work_dir is None:
            raise ValueError(f"the tasks {sorted(LOCAL_TASKS)} need a data file (and a folder for their task files)")
        include_path = local_task_dir(os.path.join(work_dir, "tasks"), data_file)
    model_args = {"pretrained": pretrained, "dtype": dtype}
    if peft is not None:
        model_args["peft"] = peft
    if tokenizer is not None:
        model_args["tokenizer"] = tokenizer
    with peft_deprecations_silenced():  # lm-eval wraps the base with PeftModel.from_pretrained
        return lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=list(tasks),
            task_manager=TaskManager(include_path=include_path),
            limit=limit,
            batch_size=batch_size,
            device=device,
            apply_chat_template=apply_chat_template,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None,
            log_samples=True,
        )


def results_table(results: Mapping[str, Any]) -> str:
    """lm-eval's own results table (markdown)."""
    from lm_eval.utils import make_table

    return make_table(results)


def problem_records(results: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    """One record per problem of a GSM8K task from lm-eval's sample logs, in the in-loop samples'
    fields: ``question``, ``reference``, ``answer``, ``prompt``, ``response`` (lm-eval's raw
    generation), ``completion`` (what the in-loop evaluator scores of it), ``prediction`` /
    ``correct`` (strict) and ``prediction_flexible`` / ``correct_flexible``."""
    records: dict[int, dict[str, Any]] = {}
    for sample in results.get("samples", {}).get(task, []):
        doc, response = sample["doc"], sample["resps"][0][0]
        completion = in_loop_completion(response)
        record = records.setdefault(sample["doc_id"], {
            "doc_id": sample["doc_id"], "question": doc["question"], "reference": doc["answer"],
            "answer": reference_answer(doc["answer"]), "prompt": sample["arguments"][0][0],
            "response": response, "completion": completion,
            "prediction": strict_answer(completion), "prediction_flexible": last_number(completion),
        })
        key = {"strict-match": "correct", "flexible-extract": "correct_flexible"}.get(sample["filter"])
        if key is not None:
            record[key] = bool(sample["exact_match"])
    return [records[doc_id] for doc_id in sorted(records)]


def accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Strict and flexible accuracy of per-problem records (in-loop samples or `problem_records`)."""
    count = len(records)
    return {
        "num_samples": count,
        "accuracy": sum(bool(r.get("correct")) for r in records) / count if count else 0.0,
        "accuracy_flexible": sum(bool(r.get("correct_flexible")) for r in records) / count if count else 0.0,
    }


def json_ready(results: Mapping[str, Any]) -> dict[str, Any]:
    """lm-eval's results without the sample logs, as JSON-serialisable values."""
    return json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=str))
