"""``python -m dude_trl.plan MODEL [options]``: parse flags, plan each model, print the result.

Exit status 0 on success; with ``--check``, 1 when a plan does not fit in ``--gpu-memory-gb``;
2 on a planning error or an unreadable model config (printed as ``error: ...`` on stderr) or a
bad flag (argparse, naming the flag and its valid range). The package does not import this
module (so ``python -m`` runs it cleanly); tests call ``dude_trl.plan.__main__.main``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..methods import METHODS
from .deepspeed import compare_with_deepspeed
from .inventory import PlanError, bundled_model_names, inspect_model, load_model_config
from .memory import PlanRequest, plan_memory
from .report import format_comparison, format_plan, format_summary


# The architecture numbers a plan is computed from: a config.json without one of them would be
# planned with the model class's defaults (a 4096-wide Llama, say) instead of being refused.
REQUIRED_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=`` accepting integers ``>= minimum``; the error states the valid range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def positive_finite_float(text: str) -> float:
    """An argparse ``type=`` accepting finite numbers ``> 0`` (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dude_trl.plan`` command line."""
    p = argparse.ArgumentParser(
        prog="python -m dude_trl.plan",
        description="Per-GPU memory plan for DuDe/LoRA fine-tuning from a model config (no weights).",
        epilog="Exit status: 0 on success (whatever the verdict, unless --check); 1 with --check when a plan does "
        "not fit; 2 on a bad flag, an unreadable model config or a request that cannot be planned.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help=f"bundled name {bundled_model_names()}, its hub id, a local dir or config.json")
    p.add_argument("--r", type=int_at_least(1), default=16, help="adapter rank (>= 1)")
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated suffixes or 'all-linear'")
    p.add_argument("--method", default="dude", choices=METHODS)
    p.add_argument("--num-gpus", type=int_at_least(1), default=1, help="total GPUs (data-parallel world size, >= 1)")
    p.add_argument("--gpus-per-node", type=int_at_least(1), default=None,
                   help="GPUs per node (>= 1, dividing --num-gpus); default: min(num-gpus, 8)")
    p.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3), help="0 = no DeepSpeed (DDP)")
    p.add_argument("--offload", action="store_true", help="offload optimizer (and with ZeRO-3 params) to CPU")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (QLoRA-style)")
    p.add_argument("--gpu-memory-gb", type=positive_finite_float, default=80.0,
                   help="usable memory per GPU, GiB (a finite number > 0)")
    p.add_argument("--seq-len", type=int_at_least(1), default=1024, help="tokens per sequence (>= 1)")
    p.add_argument("--micro-batch", type=int_at_least(1), default=1, help="per-device train batch size (>= 1)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--full-finetune", action="store_true", help="train every parameter (DeepSpeed's assumption)")
    p.add_argument("--compare-deepspeed", action="store_true",
                   help="also print DeepSpeed's ZeRO-2/3 model-state estimate (full fine-tune basis)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when a plan does not fit in --gpu-memory-gb (any of the models), 0 when "
                   "all fit, so scripts can test the verdict; without it the exit status is 0 whatever the verdict")
    return p


def _config_file(model: str) -> Path | None:
    """The JSON file `model` names locally (a config.json or a directory holding one), else None."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    return path if path.is_file() else None


def _looks_like_path(model: str) -> bool:
    return model.endswith(".json") or model.startswith((".", "~")) or os.path.isabs(model)


def _config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config it refuses (huggingface_hub's strict dataclass checks
    in recent versions, ValueError in all)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub, without strict config validation
        return (ValueError,)
    return (ValueError, StrictDataclassError)


def read_model_config(model: str):
    """`load_model_config`, with every unreadable or incomplete config refused as a ``PlanError``:
    a missing file, a file that is not a JSON object, an unknown ``model_type``, a missing or
    non-positive architecture number (``REQUIRED_CONFIG_FIELDS``)."""
    config_file = _config_file(model)
    raw = None
    if config_file is not None:
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise PlanError(f"cannot read {config_file} as a model config: {err}") from err
        if not isinstance(raw, dict):
            raise PlanError(f"{config_file} holds a JSON {type(raw).__name__}, not an object of model settings")
        from transformers import CONFIG_MAPPING

        model_type = raw.get("model_type")
        if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
            raise PlanError(f"{config_file}: model_type {model_type!r} is not one this transformers version knows")
    elif _looks_like_path(model) and not Path(model).expanduser().exists():
        raise PlanError(f"{model}: no such file or directory")
    source = str(config_file or model)
    try:
        config = load_model_config(model)
    except PlanError:
        raise
    except _config_errors() as err:  # transformers: a setting of the wrong type or an inconsistent architecture
        raise PlanError(f"{source}: {' '.join(str(err).split())}") from err
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if raw is not None:
        section = raw["text_config"] if text is not config and isinstance(raw.get("text_config"), dict) else raw
        stored = getattr(type(text), "attribute_map", {})
        missing = [f for f in REQUIRED_CONFIG_FIELDS if f not in section and stored.get(f, f) not in section]
        if missing:
            raise PlanError(f"{source} has no {', '.join(missing)}: the plan would use the "
                            f"{type(text).__name__} defaults instead of this model's numbers")
    for field in REQUIRED_CONFIG_FIELDS:
        value = getattr(text, field, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{source}: {field} must be a positive integer, got {value!r}")
    return config


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
    """CLI entry point: print a table (or JSON) for each model; exit 2 on a planning error, and with
    ``--check`` 1 when a plan does not fit."""
    args = build_parser().parse_args(argv)
    request = request_from_args(args)
    try:
        results = []
        for model in args.models:
            inventory = inspect_model(read_model_config(model))
            plan = plan_memory(model, request, inventory)
            comparison = compare_with_deepspeed(model, request, inventory) if args.compare_deepspeed else None
            results.append((plan, comparison))
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        payloads = [{**plan.to_dict(), **({"deepspeed": cmp} if cmp else {})} for plan, cmp in results]
        print(json.dumps(payloads[0] if len(payloads) == 1 else {"plans": payloads}))
        return _status(args, results)
    if len(results) == 1:
        print(format_plan(results[0][0]))
    else:
        print(format_summary([plan for plan, _ in results]))
    for plan, comparison in results:
        if comparison:
            print(f"\n{plan.model}: " + format_comparison(comparison))
    return _status(args, results)


def _status(args: argparse.Namespace, results) -> int:
    """0, or with ``--check`` 1 when any plan does not fit."""
    return 1 if args.check and not all(plan.fits for plan, _ in results) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
