"""Does lm-evaluation-harness score a dude_trl adapter as the in-loop evaluator does? Problem by problem.

    python benchmarks/lm_eval_agreement.py [--run outputs/demo_dude] [--num-problems 50]

For the base model and for the run's trained adapter (and its merged export), on the curriculum's
held-out problems (the demo's evaluation set) and on the offline GSM8K dev slice (the last 500
problems of ``../shared/data/gsm8k/train.jsonl``, when present), it

1. scores N problems with the in-loop evaluator (`dude_trl.eval.evaluate`, greedy, the run's
   generation budget), on the DuDe model itself, and writes its samples;
2. runs ``python -m dude_trl.lm_eval`` on the same problems: the adapter exported to a vanilla
   PEFT adapter (or merged) and loaded by lm-eval with plain PEFT/transformers;
3. prints one row per case: both accuracies, the problems scored differently and the problems
   whose prompt or completion differ; writes ``results.md`` and ``results.json`` (every differing
   problem included) to ``--out``, and keeps each case's exports and outputs under ``--work-dir``.

Run the offline demo first (the README's first command) for ``--run``.
Needs ``pip install 'dude_trl[eval]'``. About 20 minutes on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dude_trl.data import GSM8K_DEV_SPLIT
from dude_trl.eval import GSM8KTask, evaluate, write_samples_jsonl
from dude_trl.eval.gsm8k import load_gsm8k_eval_dataset
from dude_trl.lm_eval.__main__ import main as lm_eval_main
from dude_trl.saving import load_dude_model

GSM8K_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="outputs/demo_dude", help="a DuDe run directory (default: the demo's)")
    parser.add_argument("--base", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--num-problems", type=int, default=50)
    parser.add_argument("--gsm8k-file", default=str(GSM8K_FILE), help="GSM8K train file (its last 500: the dev set)")
    parser.add_argument("--out", default="benchmarks/results/lm_eval_agreement", help="results.md/.json")
    parser.add_argument("--work-dir", default="outputs/lm_eval_agreement",
                        help="exports, samples and lm-eval's outputs of every case")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    for path, what in ((args.run, "--run"), (args.base, "--base")):
        if not os.path.isdir(path):
            parser.exit(2, f"error: {what} {path!r} is not a directory (run the offline demo first for --run).\n")
    if args.num_problems <= 0:
        parser.exit(2, "error: --num-problems must be positive.\n")
    return args


def data_sets(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """(name, the --data/--split flags of dude_trl.lm_eval, generation budget) per evaluation set."""
    sets = [("curriculum", ["--data", "curriculum"], 64)]
    if os.path.isfile(args.gsm8k_file):
        sets.append(("gsm8k_dev", ["--data", args.gsm8k_file, "--split", GSM8K_DEV_SPLIT], 256))
    else:
        print(f"{args.gsm8k_file} not found: the GSM8K dev slice is skipped.")
    return sets


def in_loop(model, tokenizer, data_flags: list[str], budget: int, args: argparse.Namespace, path: Path) -> float:
    """Score with the in-loop evaluator and write its samples to `path`; returns the seconds taken."""
    name = data_flags[1]
    split = data_flags[3] if len(data_flags) > 3 else None
    dataset = load_gsm8k_eval_dataset(name, num_samples=args.num_problems, split=split)
    start = time.perf_counter()
    result = evaluate(model, tokenizer, GSM8KTask(), dataset, max_new_tokens=budget, batch_size=args.batch_size,
                      num_samples=args.num_problems, progress=False)
    write_samples_jsonl(result["samples"], str(path))
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    models = {  # name: (model, its tokenizer, what dude_trl.lm_eval scores, [(label, extra flags)])
        "base": (lambda: AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval(), args.base,
                 args.base, [("base", [])]),
        "adapter": (lambda: load_dude_model(args.base, args.run, dtype=torch.float32, progress=False), args.run,
                    args.run, [("adapter", []), ("adapter merged", ["--merged"])]),
    }
    rows = []
    for model_name, (make_model, tokenizer_source, target, variants) in models.items():
        model, tokenizer = make_model(), AutoTokenizer.from_pretrained(tokenizer_source)
        for data_name, data_flags, budget in data_sets(args):
            samples = work / f"{model_name}_{data_name}_in_loop.jsonl"
            seconds = in_loop(model, tokenizer, data_flags, budget, args, samples)
            for label, extra in variants:
                case_out = work / f"{label.replace(' ', '_')}_{data_name}"
                flags = [target, *data_flags, "--limit", str(args.num_problems), "--compare", str(samples),
                         "--out", str(case_out), "--max-gen-toks", str(budget), "--batch-size", str(args.batch_size),
                         "--device", "cpu", *extra]
                start = time.perf_counter()
                lm_eval_main(flags)
                agreement = json.loads((case_out / "agreement.json").read_text())
                rows.append({
                    "model": label, "data": data_name, "problems": agreement["problems"],
                    "in_loop": agreement["in_loop"], "lm_eval": agreement["lm_eval"],
                    "disagreements": agreement["disagreements"], "differences": agreement["differences"],
                    "in_loop_s": round(seconds, 1), "lm_eval_s": round(time.perf_counter() - start, 1),
                })
        del model
    write_results(rows, out, args)


def write_results(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    def pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    lines = [
        f"`python benchmarks/lm_eval_agreement.py --run {args.run} --num-problems {args.num_problems}` "
        f"(base {args.base}; lm-eval 0.4.13; CPU, float32, greedy)\n",
        "| model | data | problems | in-loop strict | lm-eval strict | in-loop flexible | lm-eval flexible | "
        "scored differently | prompt/completion differ | in-loop s | lm-eval s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ours, theirs = row["in_loop"], row["lm_eval"]
        lines.append(
            f"| {row['model']} | {row['data']} | {row['problems']} | {pct(ours['accuracy'])} | "
            f"{pct(theirs['accuracy'])} | {pct(ours['accuracy_flexible'])} | {pct(theirs['accuracy_flexible'])} | "
            f"{row['disagreements']} | {len(row['differences'])} | {row['in_loop_s']} | {row['lm_eval_s']} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
