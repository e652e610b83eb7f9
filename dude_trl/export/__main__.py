"""``python -m dude_trl.export``: export a saved DuDe adapter for the original base.

    python -m dude_trl.export --adapter DIR --base MODEL --to merged|dora --out DIR

``--to dora`` writes the vanilla PEFT adapter (DoRA, or LoRA for pissa/lora) that computes on
the unmodified base what the DuDe model computes; ``--to merged`` writes the merged transformers
model (for servers without DoRA support, e.g. vLLM) and the base's tokenizer.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

import torch
from transformers import AutoConfig, AutoTokenizer

from ..bases.bnb import bnb_config_from_record
from ..saving import load_dude_model, read_dude_config
from .convert import export_merged_model, export_peft_adapter

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _base_dtype(base: str, requested: str) -> Optional[torch.dtype]:
    """The dtype to save a merged model in: `requested`, or for ``auto`` the base's own (float32 if unknown)."""
    if requested != "auto":
        return _DTYPES[requested]
    stored = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored.removeprefix("torch."))
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _copy_tokenizer(base: str, output_dir: str) -> bool:
    """Save the base's tokenizer next to the merged model, if the base has one."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError) as err:
        logger.info("No tokenizer copied from %s (%s).", base, err)
        return False
    tokenizer.save_pretrained(output_dir)
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dude_trl.export",
        description="Export a saved DuDe adapter for the original base: a merged transformers model (for serving, "
        "e.g. vLLM) or a vanilla PEFT DoRA/LoRA adapter (loadable without dude_trl).",
    )
    parser.add_argument("--adapter", required=True, help="adapter directory (save_pretrained / Trainer checkpoint)")
    parser.add_argument("--base", required=True, help="the original base model: hub id or local directory")
    parser.add_argument("--to", required=True, choices=("merged", "dora"), help="what to write")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", *_DTYPES),
        help="dtype of the merged model (default: the base's own); the merge itself runs in float32",
    )
    parser.add_argument("--adapter-name", default="default", help="PEFT adapter name (default: %(default)s)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``python -m dude_trl.export``."""
    args = _parser().parse_args(argv)
    record = read_dude_config(args.adapter).base_quantization
    quantization_config = None
    if record is not None:
        # The trained model computed with the quantized residual: rebuild exactly that one
        # (merging dequantizes it), instead of silently exporting another model.
        quantization_config = bnb_config_from_record(record)
        print(f"{args.adapter} was trained on a bitsandbytes base {record}: loading the base quantized the same way.")
    model = load_dude_model(
        args.base, args.adapter, adapter_name=args.adapter_name, quantization_config=quantization_config,
        dtype=torch.float32,
    )
    if args.to == "dora":
        export_peft_adapter(model, args.out, args.adapter_name, base_model_name_or_path=args.base)
        print(f"Wrote a PEFT adapter for {args.base} to {args.out}: PeftModel.from_pretrained(base, {args.out!r}).")
        return
    export_merged_model(model, args.out, args.adapter_name, dtype=_base_dtype(args.base, args.dtype))
    tokenizer = " and its tokenizer" if _copy_tokenizer(args.base, args.out) else ""
    print(f"Wrote the merged model{tokenizer} to {args.out}.")



if __name__ == "__main__":
    main()
