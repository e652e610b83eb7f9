"""``python -m dude_trl.plan MODEL [options]``: parse flags, plan each model, print the result.

Exit status 0 on success, 2 on a planning error (printed as ``error: ...`` on stderr) or a bad
flag (argparse). The package does not import this module (so ``python -m`` runs it cleanly);
tests call ``dude_trl.plan.__main__.main``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ..methods import METHODS
from .deepspeed import compare_with_deepspeed
from .inventory import PlanError, bundled_model_names, inspect_model, load_model_config
from .memory import PlanRequest, plan_memory
from .report import format_comparison, format_plan, format_summary


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dude_trl.plan`` command line."""
    p = argparse.ArgumentParser(
        prog="python -m dude_trl.plan",
        description="Per-GPU memory plan for DuDe/LoRA fine-tuning from a model config (no weights).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help=f"bundled name {bundled_model_names()}, its hub id, a local dir or config.json")
    p.add_argument("--r", type=int, default=16, help="adapter rank")
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated suffixes or 'all-linear'")
    p.add_argument("--method", default="dude", choices=METHODS)
    p.add_argument("--num-gpus", type=int, default=1, help="total GPUs (data-parallel world size)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: min(num-gpus, 8)")
    p.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3), help="0 = no DeepSpeed (DDP)")
    p.add_argument("--offload", action="store_true", help="offload optimizer (and with ZeRO-3 params) to CPU")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (QLoRA-style)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="usable memory per GPU, GiB")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=1, help="per-device train batch size")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--full-finetune", action="store_true", help="train every parameter (DeepSpeed's assumption)")
    p.add_argument("--compare-deepspeed", action="store_true",
                   help="also print DeepSpeed's ZeRO-2/3 model-state estimate (full fine-tune basis)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    """Map parsed CLI arguments to a ``PlanRequest``."""
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return PlanRequest(
        r=args.r,
        target_modules=targets,
        method=args.method,
        num_gpus=args.num_gpus,
        gpus_per_node=args.gpus_per_node,
        zero_stage=args.zero_stage,
        offload=args.offload,
        load_in_4bit=args.load_in_4bit,
        gpu_memory_gb=args.gpu_memory_gb,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
        full_finetune=args.full_finetune,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print a table (or JSON) for each model; exit 2 on a planning error."""
    args = build_parser().parse_args(argv)
    request = request_from_args(args)
    try:
        results = []
        for model in args.models:
            inventory = inspect_model(load_model_config(model))
            plan = plan_memory(model, request, inventory)
            comparison = compare_with_deepspeed(model, request, inventory) if args.compare_deepspeed else None
            results.append((plan, comparison))
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        payloads = [{**plan.to_dict(), **({"deepspeed": cmp} if cmp else {})} for plan, cmp in results]
        print(json.dumps(payloads[0] if len(payloads) == 1 else {"plans": payloads}))
        return 0
    if len(results) == 1:
        print(format_plan(results[0][0]))
    else:
        print(format_summary([plan for plan, _ in results]))
    for plan, comparison in results:
        if comparison:
            print(f"\n{plan.model}: " + format_comparison(comparison))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
