"""``python -m dude_trl.export``: export a saved DuDe adapter for the original base.

    python -m dude_trl.export --adapter DIR --base MODEL --to merged|dora --out DIR [--overwrite]

``--to dora`` writes the vanilla PEFT adapter (DoRA, or LoRA for pissa/lora) that computes on
the unmodified base what the DuDe model computes; ``--to merged`` writes the merged transformers
model (for servers without DoRA support, e.g. vLLM). Both come with the tokenizer (the adapter
folder's, else the base's), the generation config and a model card (README.md).

The command never changes its inputs and never reports a success it did not have: ``--out`` may
not be, contain or lie inside the adapter (or a local base) directory, nor be an existing file; an
existing non-empty ``--out`` directory is replaced only with ``--overwrite``. Everything is
written to a temporary folder next to ``--out`` (``.NAME.tmp-XXXX``) and renamed into place at
the end, so a failure midway leaves ``--out`` as it was. A user error (a missing or damaged
adapter, a missing or wrong base, a bad flag) prints ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

from .saved import DTYPES, BaseLoadError, export_saved_adapter

_PROG = "python -m dude_trl.export"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Export a saved DuDe adapter for the original base: a merged transformers model (for serving, "
        "e.g. vLLM) or a vanilla PEFT DoRA/LoRA adapter (loadable without dude_trl). The output is written to a "
        "temporary folder next to --out and renamed into place only when complete; the inputs are never changed. "
        "Exit status 0 on success, 2 on a user error (printed as 'error: ...').",
    )
    parser.add_argument("--adapter", required=True, help="adapter directory (save_pretrained / Trainer checkpoint)")
    parser.add_argument("--base", required=True, help="the original base model: hub id or local directory")
    parser.add_argument("--to", required=True, choices=("merged", "dora"), help="what to write")
    parser.add_argument(
        "--out", required=True,
        help="output directory: new, empty, or (with --overwrite) replaced; not the adapter or inside it",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing non-empty --out directory (only once the export has succeeded)",
    )
    parser.add_argument(
        "--dtype", default=None, choices=("auto", *DTYPES),
        help="dtype of the merged model, --to merged only (default: auto, the base's own); the merge itself runs "
        "in float32",
    )
    parser.add_argument("--adapter-name", default="default", help="PEFT adapter name (default: %(default)s)")
    return parser


def _fail(message: str) -> NoReturn:
    """Report a user error as argparse does (``PROG: error: ...`` on stderr, no traceback); exit status 2."""
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (both already resolved)."""
    return os.path.commonpath([path, folder]) == folder


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded, every --adapter/--base/--out that would lose data or fail late."""
    adapter = os.path.realpath(args.adapter)
    if not os.path.exists(adapter):
        _fail(f"--adapter {args.adapter!r} does not exist.")
    if not os.path.isdir(adapter):
        _fail(f"--adapter {args.adapter!r} is not a directory (pass the folder save_pretrained wrote).")
    if os.path.isabs(args.base) or args.base.startswith(".") or os.path.exists(args.base):  # a path, not a hub id
        if not os.path.isdir(args.base):
            _fail(f"--base {args.base!r} is not a model directory (no such folder).")
    if args.to == "dora" and args.dtype not in (None, "auto"):
        _fail("--dtype applies to --to merged only; --to dora writes the adapter tensors as they are.")
    out = os.path.realpath(args.out)
    inputs = {"--adapter": adapter}
    if os.path.isdir(args.base):
        inputs["--base"] = os.path.realpath(args.base)
    for flag, path in inputs.items():
        if _within(out, path):
            where = "is" if out == path else "lies inside"
            _fail(f"--out {args.out!r} {where} the {flag} directory {path!r}: the export never writes into its "
                  f"input. Choose an --out outside it.")
        if _within(path, out):
            _fail(f"--out {args.out!r} contains the {flag} directory {path!r}: replacing it would delete the input. "
                  f"Choose another --out.")
    if os.path.exists(out) and not os.path.isdir(out):
        _fail(f"--out {args.out!r} exists and is not a directory; remove it or choose another --out.")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        _fail(f"--out {args.out!r} is a non-empty directory; pass --overwrite to replace it (only once the export "
              f"has succeeded), or choose another --out.")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``python -m dude_trl.export``; a user error exits with status 2 (`_fail`)."""
    args = _parser().parse_args(argv)
    args.adapter, args.base, args.out = (os.path.expanduser(path) for path in (args.adapter, args.base, args.out))
    _check_paths(args)

    def note_quantized(record: dict) -> None:
        print(f"{args.adapter} was trained on a bitsandbytes base {record}: loading the base quantized the same way.")

    try:
        tokenizer = export_saved_adapter(
            args.adapter, args.base, args.to, args.out, adapter_name=args.adapter_name, dtype=args.dtype,
            on_quantized_base=note_quantized,
        )
    except ValueError as err:  # a damaged adapter, a base it was not trained on, or one convert refuses
        _fail(str(err))
    except BaseLoadError as err:
        _fail(str(err))
    except OSError as err:  # disk full, permissions, ...
        _fail(f"cannot write {args.out!r}: {err}; nothing was written there.")
    with_tokenizer = " with its tokenizer" if tokenizer else ""
    if args.to == "dora":
        print(f"Wrote a PEFT adapter for {args.base}{with_tokenizer} to {args.out}: "
              f"PeftModel.from_pretrained(base, {args.out!r}).")
    else:
        print(f"Wrote the merged model{with_tokenizer} to {args.out}.")


if __name__ == "__main__":
    main()
