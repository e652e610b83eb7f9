"""What a serving stack needs next to exported weights: the tokenizer, the generation config, a model card.

`lm_eval --model hf`, vLLM and `transformers.pipeline` read the tokenizer (with its chat template)
and ``generation_config.json`` from the folder they load, and the hub shows ``README.md``. A
DuDe run saves its tokenizer with the adapter (TRL's ``save_model``), which may differ from the
base's (an added pad token, a chat template), so that one is preferred.

The card states the method, rank, base model and the accuracy measured so far; its last section
is the accuracy table, so an evaluator can add a row (`append_accuracy_row`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from transformers import AutoTokenizer, GenerationConfig

from ..config import DuDeConfig
from ..methods import get_method

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
_ACCURACY_HEADER = (
    "| evaluator | data | problems | strict | flexible | step |\n"
    "|---|---|---:|---:|---:|---:|\n"
)
_SPLIT_WHERE = {"sqrt": "split as sqrt(S) between B and A", "A": "singular values in A", "B": "singular values in B"}


def save_tokenizer(folder: str, sources: Sequence[str]) -> Optional[str]:
    """Save the first tokenizer found in `sources` (local folders or hub ids) into `folder`; its source, or None."""
    for source in sources:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.info("No tokenizer in %s (%s).", source, err)
            continue
        tokenizer.save_pretrained(folder)
        return source
    return None


def save_generation_config(folder: str, base: str) -> bool:
    """Copy the base's ``generation_config.json`` (EOS tokens, defaults) into `folder`, if it has one."""
    try:
        config = GenerationConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        logger.info("No generation config in %s (%s).", base, err)
        return False
    config.save_pretrained(folder)
    return True


def _method_sentence(method: str) -> str:
    """What `method` trains, in one clause."""
    row = get_method(method)
    parts = ["DoRA's magnitude/direction split (a trainable magnitude per output row)"] if row.has_magnitude else []
    if row.uses_svd_init:
        parts.append(f"initialised from the top-r SVD of the pretrained weight ({_SPLIT_WHERE[row.split]}), the "
                     f"frozen base holding the residual")
    else:
        parts.append("LoRA's initialisation (Kaiming A, zero B) on the unchanged base")
    return f"`{method}`: " + ", ".join(parts)


def accuracy_row(
    evaluator: str, data: str, metrics: Mapping[str, Any], step: Optional[int] = None
) -> str:
    """One row of the card's accuracy table (`metrics`: ``num_samples``, ``accuracy``, ``accuracy_flexible``)."""
    def percent(key: str) -> str:
        value = metrics.get(key)
        return "" if value is None else f"{100 * float(value):.1f}%"

    problems = metrics.get("num_samples")
    return (
        f"| {evaluator} | {data} | {'' if problems is None else int(problems)} | {percent('accuracy')} | "
        f"{percent('accuracy_flexible')} | {'' if step is None else step} |\n"
    )


def model_card(
    *,
    base: str,
    config: DuDeConfig,
    kind: str,
    accuracy_rows: Sequence[str] = (),
) -> str:
    """The README.md of an export: `kind` is ``"adapter"`` (a vanilla PEFT adapter) or ``"merged"``."""
    method = get_method(config.method)
    peft_kind = "DoRA" if method.has_magnitude else "LoRA"
    exported_rank = 2 * config.r if method.uses_svd_init else config.r
    targets = config.target_modules
    targets = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else str(targets)
    if kind == "adapter":
        what = (
            f"A plain PEFT {peft_kind} adapter of rank {exported_rank} for the unmodified base: it computes what "
            f"the trained dude_trl model computes, and loads without dude_trl installed."
        )
        use = (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "THIS_FOLDER")\n'
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")\n```\n\n'
            f"lm-evaluation-harness: `lm_eval --model hf --model_args pretrained={base},peft=THIS_FOLDER,"
            f"tokenizer=THIS_FOLDER --tasks gsm8k --apply_chat_template`\n"
        )
        library = "peft"
    elif kind == "merged":
        what = "The adapter merged into the base weights: a plain transformers model (for vLLM and other servers)."
        use = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")\n'
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")\n```\n\n'
            "lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=THIS_FOLDER --tasks gsm8k "
            "--apply_chat_template`; vLLM: `vllm serve THIS_FOLDER`\n"
        )
        library = "transformers"
    else:
        raise ValueError(f"kind must be 'adapter' or 'merged', got {kind!r}")
    rank = f"{config.r} (exported: {exported_rank})" if kind == "adapter" else str(config.r)
    tags = ["dude_trl", config.method, peft_kind.lower(), "peft"]
    front = f"---\nbase_model: {base}\nlibrary_name: {library}\npipeline_tag: text-generation\ntags:\n"
    front += "".join(f"- {tag}\n" for tag in tags) + "---\n\n"
    return (
        front
        + f"# {config.method} fine-tune of {base}\n\n"
        + f"Trained with dude_trl, method {_method_sentence(config.method)}. {what}\n\n"
        + "| | |\n|---|---|\n"
        + f"| base model | `{base}` |\n| method | `{config.method}` |\n| rank | {rank} |\n"
        + f"| lora_alpha | {config.lora_alpha} |\n| target modules | {targets} |\n\n"
        + "## Use\n\n" + use + "\n"
        + "## Measured accuracy\n\n"
        + "Greedy decoding, zero-shot. Strict: the stated final answer (`#### N`, `\\boxed{N}` or `The answer is N`); "
        + "flexible: the last number. "
        + "`python -m dude_trl.lm_eval` adds the lm-evaluation-harness row.\n\n"
        + _ACCURACY_HEADER + "".join(accuracy_rows)
    )


def write_model_card(folder: str, **card: Any) -> str:
    """Write `model_card(**card)` to ``folder/README.md``; returns its path."""
    path = os.path.join(folder, CARD_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(model_card(**card))
    return path


def append_accuracy_row(folder: str, row: str) -> bool:
    """Add `row` to the accuracy table ending the card in `folder`; False (nothing written) when the
    folder has no card of ours (the table is its last section)."""
    path = os.path.join(folder, CARD_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return False
    if _ACCURACY_HEADER not in text or not text.endswith("|\n"):
        return False
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(row)
    return True
