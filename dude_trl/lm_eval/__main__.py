"""``python -m dude_trl.lm_eval``: score a run's adapter with lm-evaluation-harness.

    python -m dude_trl.lm_eval RUN_OR_ADAPTER_DIR [--tasks gsm8k_local] [--data FILE.jsonl] [--limit N] [--merged]

PATH may be a DuDe run or checkpoint directory (its adapter is first exported, as
``python -m dude_trl.export`` does, to ``OUT/adapter`` -- or ``OUT/merged`` with ``--merged`` --
and lm-eval loads that export with plain PEFT/transformers), a vanilla PEFT adapter, or a model
directory or hub id (the base model itself). lm-eval's results table is printed and its results
written to ``OUT/results.json`` (``OUT`` defaults to ``PATH/lm_eval``).

The shipped ``gsm8k_local`` task asks and scores as the in-loop evaluator does, on a local
GSM8K-format file (``--data``; a run's in-loop problems by default). When the run's in-loop
samples of the adapter's step are found (or ``--compare FILE`` names some), the two evaluators
are compared problem by problem and the agreement is printed and written to
``OUT/agreement.json``. A user error prints ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, NoReturn, Optional, Sequence

import torch
from transformers import AutoTokenizer

from ..eval.gsm8k import load_gsm8k_eval_dataset
from ..eval.task import has_chat_template
from ..export.saved import BaseLoadError, export_saved_adapter
from ..export.serving import accuracy_row, append_accuracy_row
from ..run_record import eval_settings, in_loop_samples_path, read_samples, trainer_state
from ..saving import CONFIG_NAME
from .agreement import compare, summary
from .harness import (
    INSTALL_HINT,
    LOCAL_TASKS,
    LmEvalMissing,
    accuracy,
    json_ready,
    local_task_for,
    problem_records,
    results_table,
    run_lm_eval,
    write_problems,
)

_PROG = "python -m dude_trl.lm_eval"
COMMAND_FILE = "command.txt"  # the command that wrote an output folder; marks it as this command's


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Score a DuDe run's adapter (exported to a vanilla PEFT adapter or a merged model), a PEFT "
        "adapter or a model with lm-evaluation-harness, and compare it problem by problem with the run's in-loop "
        f"GSM8K evaluation. Needs lm-eval: {INSTALL_HINT}. Exit status 2 on a user error.",
    )
    parser.add_argument("path", metavar="RUN_OR_ADAPTER_DIR", help="a run/checkpoint dir, a PEFT adapter, or a model")
    parser.add_argument("--base", help="the base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument(
        "--tasks", default="gsm8k_local",
        help="comma-separated lm-eval tasks (default: %(default)s; gsm8k_local_plain for models without a chat "
        "template is picked automatically). Stock tasks (gsm8k, mmlu, arc_challenge, ...) need the network.",
    )
    parser.add_argument(
        "--data", help="the gsm8k_local problems: a GSM8K-format .json/.jsonl file, 'curriculum', 'synthetic' or a "
        "hub id (default: the problems of the run's in-loop evaluation)",
    )
    parser.add_argument("--split", help="split of --data, slices included, e.g. 'train[-500:]'")
    parser.add_argument("--limit", type=int, help="score only the first N problems")
    parser.add_argument("--merged", action="store_true", help="evaluate the merged model instead of the adapter")
    parser.add_argument("--out", help="output folder (default: PATH/lm_eval; for a model, ./lm_eval/NAME)")
    parser.add_argument("--compare", help="in-loop samples file to compare with (default: the run's, when found)")
    parser.add_argument("--no-compare", action="store_true", help="do not compare with the in-loop evaluation")
    parser.add_argument("--batch-size", type=int, help="lm-eval batch size (default: the run's eval batch size, 16)")
    parser.add_argument(
        "--max-gen-toks", type=int, help="generation budget (default: the run's eval_task_max_new_tokens, else 256)"
    )
    parser.add_argument(
        "--no-chat-template", action="store_true",
        help="do not ask through the tokenizer's chat template (default: use it when there is one, as in the loop)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    return parser


def _fail(message: str) -> NoReturn:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _looks_like_path(text: str) -> bool:
    return os.path.isabs(text) or text.startswith(".") or os.path.exists(text)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        _fail(f"cannot read {path}: {err}")


def _classify(path: str) -> tuple[str, dict[str, Any]]:
    """(kind, adapter config): ``dude`` (a DuDe adapter), ``peft`` (a vanilla one) or ``model``."""
    if not _looks_like_path(path):
        return "model", {}  # a hub id
    if not os.path.isdir(path):
        _fail(f"{path!r} is not a directory (pass a run, checkpoint or adapter folder, or a model).")
    config_path = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(config_path):
        config = _read_json(config_path)
        return ("dude" if "method" in config else "peft"), config
    if os.path.isfile(os.path.join(path, "config.json")):
        return "model", {}
    _fail(f"{path!r} holds neither {CONFIG_NAME} (an adapter) nor config.json (a model).")


def _output_folder(args: argparse.Namespace, kind: str) -> str:
    """--out, else ``PATH/lm_eval`` for a run or adapter and ``./lm_eval/NAME`` for a model; a non-empty
    folder this command did not write (no ``COMMAND_FILE``) is refused, so nothing of the user's is replaced."""
    if args.out:
        out = args.out
    elif kind == "model":
        name = os.path.basename(os.path.normpath(args.path)) if os.path.isdir(args.path) else args.path
        out = os.path.join("lm_eval", name.replace("/", "__"))
    else:
        out = os.path.join(args.path, "lm_eval")
    if os.path.exists(out) and not os.path.isdir(out):
        _fail(f"--out {out!r} exists and is not a directory; choose another --out.")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, COMMAND_FILE)):
        _fail(f"--out {out!r} is a non-empty folder this command did not write; choose another --out.")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, COMMAND_FILE), "w", encoding="utf-8") as handle:
        handle.write(" ".join([_PROG, *map(shlex.quote, args.argv)]) + "\n")
    return out


def _in_loop_samples(args: argparse.Namespace) -> Optional[str]:
    """The in-loop samples to compare with: --compare, else the run's samples of the adapter's step."""
    if args.no_compare:
        return None
    if args.compare:
        if not os.path.isfile(args.compare):
            _fail(f"--compare {args.compare!r} is not a file (pass an in-loop gsm8k_samples_step<N>.jsonl).")
        return args.compare
    state = trainer_state(args.path) if os.path.isdir(args.path) else None
    if state is None or "global_step" not in state:
        return None
    found = in_loop_samples_path(args.path, state["global_step"])
    return None if found is None else str(found)


def _problems(args: argparse.Namespace, samples: Optional[list[dict]], settings: dict[str, Any]) -> list[tuple]:
    """(question, reference) pairs for the shipped tasks: --data, else the compared samples, else the run's
    in-loop evaluation set."""
    data, split = args.data, args.split
    if data is None and samples is not None:
        return [(row["question"], row["reference"]) for row in samples]
    num_samples = None
    if data is None:
        data, split = settings.get("eval_task_dataset"), split or settings.get("eval_task_split")
        num_samples = settings.get("eval_task_num_samples")
        if data is None:
            _fail("no problems to score: pass --data FILE.jsonl (GSM8K format), 'curriculum' or a hub id.")
    try:
        dataset = load_gsm8k_eval_dataset(data, num_samples=num_samples, split=split)
    except (ValueError, FileNotFoundError) as err:
        _fail(f"cannot read --data {data!r}: {err}")
    return list(zip(dataset["question"], dataset["answer"]))


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _prepare_model(args: argparse.Namespace, kind: str, config: dict[str, Any], out: str) -> dict[str, Optional[str]]:
    """lm-eval's pretrained/peft/tokenizer for PATH, exporting a DuDe adapter first."""
    if kind == "model":
        return {"pretrained": args.path, "peft": None, "tokenizer": None, "card": None}
    base = args.base or config.get("base_model_name_or_path")
    if not base:
        _fail(f"{args.path!r} does not name its base model; pass --base.")
    if _looks_like_path(base) and not os.path.isdir(base):
        _fail(f"the base model {base!r} is not a folder; pass --base (a local folder or a hub id).")
    if kind == "peft":
        has_tokenizer = os.path.isfile(os.path.join(args.path, "tokenizer_config.json"))
        return {"pretrained": base, "peft": args.path, "tokenizer": args.path if has_tokenizer else base, "card": None}
    folder = os.path.join(out, "merged" if args.merged else "adapter")
    print(f"Exporting {args.path} ({'merged model' if args.merged else 'vanilla PEFT adapter'}) to {folder}")
    try:
        export_saved_adapter(args.path, base, "merged" if args.merged else "dora", folder)
    except BaseLoadError as err:
        _fail(str(err))
    except (ValueError, OSError) as err:
        _fail(f"cannot export {args.path!r}: {err}")
    if args.merged:
        return {"pretrained": folder, "peft": None, "tokenizer": None, "card": folder}
    return {"pretrained": base, "peft": folder, "tokenizer": folder, "card": folder}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``python -m dude_trl.lm_eval``; a user error exits with status 2."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = _parser().parse_args(argv)
    args.argv = argv
    for name in ("path", "base", "data", "out", "compare"):
        if getattr(args, name) is not None:
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    for name in ("limit", "batch_size", "max_gen_toks"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            _fail(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    kind, adapter_config = _classify(args.path)
    if args.merged and kind != "dude":
        _fail("--merged applies to a DuDe run or adapter directory, which is merged before scoring.")
    out = _output_folder(args, kind)
    settings = eval_settings(args.path) if kind != "model" else {}
    samples_path = _in_loop_samples(args)
    samples = read_samples(samples_path) if samples_path else None
    if samples is not None and args.limit is not None:
        samples = samples[:args.limit]
    data_label = args.data or (f"the in-loop problems ({os.path.basename(samples_path)})" if samples else
                               str(settings.get("eval_task_dataset")))

    model = _prepare_model(args, kind, adapter_config, out)
    tokenizer_source = model["tokenizer"] or model["pretrained"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as err:
        _fail(f"cannot load a tokenizer from {tokenizer_source!r}: {err}")
    requested = [task.strip() for task in args.tasks.split(",") if task.strip()]
    # Asked as in the loop: through the chat template when the tokenizer has one, unless told otherwise.
    use_chat_template = (
        has_chat_template(tokenizer) and not args.no_chat_template and "gsm8k_local_plain" not in requested
    )
    tasks = [local_task_for(task, use_chat_template) for task in requested]
    data_file = None
    if any(task in LOCAL_TASKS for task in tasks):
        problems = _problems(args, samples, settings)
        data_file = write_problems(problems, os.path.join(out, "problems.jsonl"))
        print(f"Scoring {', '.join(tasks)} on {min(len(problems), args.limit or len(problems))} problems "
              f"({data_label}), {'chat template' if use_chat_template else 'plain'} prompts.")

    try:
        results = run_lm_eval(
            pretrained=model["pretrained"], peft=model["peft"], tokenizer=model["tokenizer"], tasks=tasks,
            data_file=data_file, work_dir=out, limit=args.limit,
            batch_size=args.batch_size or settings.get("eval_task_batch_size") or 16,
            device=_device(args.device), dtype=args.dtype,
            max_gen_toks=args.max_gen_toks or settings.get("eval_task_max_new_tokens"),
            apply_chat_template=use_chat_template,
        )
    except LmEvalMissing as err:
        _fail(str(err))
    except (KeyError, ValueError) as err:  # lm-eval: an unknown task name, a bad task config
        _fail(f"lm-eval could not run {tasks}: {err}")
    print(results_table(results))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(json_ready(results), handle, indent=2)
    for task in tasks:
        if task not in LOCAL_TASKS:
            continue
        records = problem_records(results, task)
        with open(os.path.join(out, f"{task}_problems.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if model["card"]:
            append_accuracy_row(model["card"], accuracy_row(f"lm-eval {task}", data_label, accuracy(records)))
        if samples is not None:
            agreement = compare(samples, records)
            with open(os.path.join(out, "agreement.json"), "w", encoding="utf-8") as handle:
                json.dump({"in_loop_samples": samples_path, "task": task, **agreement}, handle, indent=2)
            print(summary(agreement))
    print(f"Wrote lm-eval's results to {os.path.join(out, 'results.json')}")


if __name__ == "__main__":
    main()
