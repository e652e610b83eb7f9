"""GSM8K evaluation: answer extraction, correctness, and batched greedy generation.

``evaluate`` runs on one process or on every rank of a ``torch.distributed`` job
(DDP or DeepSpeed, ZeRO-3 included): prompts are split across ranks and the
per-rank results are gathered so that every rank returns the same global result.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any, Iterator

import datasets
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from dude_trl.data import PLAIN_PROMPT_TEMPLATE, make_gsm8k_dataset, qa_columns

DEFAULT_EVAL_SIZE = 200
TOLERANCE = Decimal("1e-6")

# --- answer extraction -------------------------------------------------------------------------

# A number: 1,234,567 / 1234 / 12.5 / .5, optionally with "$" and a sign ("-5", "-$5", "$-5").
# The sign must touch the number and not follow a word character, so "10-4" and "10 - 4"
# read as 10 and 4, not 10 and -4.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-)?(?:\$\s?(?P<dollar_sign>-)?)?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_HASHES = "####"
_ANSWER_IS = re.compile(r"the (?:final )?answer is\s*:?", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}")


def normalize_number(text: str) -> str | None:
    """Canonical string of a plain number: ``"1,200.00"`` -> ``"1200"``, ``".5"`` -> ``"0.5"``.

    Returns None when ``text`` is not a number. Works on the digits as text, so
    arbitrarily long numbers normalize without overflow.
    """
    text = text.strip().replace(",", "")
    negative = text.startswith("-")
    text = text.lstrip("-+")
    if not re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", text):
        return None
    whole, _, frac = text.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    body = f"{whole}.{frac}" if frac else whole
    if body == "0":
        return "0"
    return f"-{body}" if negative else body


def _numbers(text: str) -> list[str]:
    """All numbers in ``text``, normalized, in order of appearance."""
    found = []
    for match in _NUMBER.finditer(text):
        negative = bool(match.group("sign") or match.group("dollar_sign"))
        value = normalize_number(("-" if negative else "") + match.group("digits"))
        if value is not None:
            found.append(value)
    return found


def _first_number_on_line(text: str) -> str | None:
    """First number on the first non-empty line of ``text``."""
    stripped = text.lstrip()
    line = stripped.split("\n", 1)[0]
    numbers = _numbers(line)
    return numbers[0] if numbers else None


def _after_hashes(text: str) -> str | None:
    index = text.rfind(_HASHES)
    return None if index < 0 else _first_number_on_line(text[index + len(_HASHES):])


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opened just before ``start``, or None if it is unclosed."""
    depth = 1
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return None


def _fraction_value(numerator: str, denominator: str) -> str | None:
    if int(denominator) == 0:
        return None
    with localcontext() as ctx:
        ctx.prec = 30
        value = Decimal(numerator) / Decimal(denominator)
        return normalize_number(format(value.quantize(Decimal("1e-12")), "f"))


def _in_boxed(text: str) -> str | None:
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    content = _braced(text, matches[-1].end())
    if content is None:
        return None
    frac = _FRAC.search(content)
    if frac and len(frac.group(1)) + len(frac.group(2)) < 40:
        return _fraction_value(frac.group(1), frac.group(2))
    numbers = _numbers(content)
    return numbers[0] if numbers else None


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    return _first_number_on_line(text[matches[-1].end():]) if matches else None


def extract_answer(text: str) -> str | None:
    """Extract the final numeric answer of a solution, as a normalized number string.

    Markers, in order of precedence (the first that yields a number wins):

    1. ``#### <number>`` (GSM8K) -- the last ``####`` in the text;
    2. ``\\boxed{<number>}`` -- the last box; ``\\frac{a}{b}`` inside it is evaluated;
    3. ``The answer is[:] <number>`` (MetaMathQA), case-insensitive -- the last one;
    4. otherwise the last number anywhere in the text.

    After a marker, the first number on the same line counts, so trailing text
    (``"#### 18 dollars. Next question 5"``) is ignored. Numbers may carry ``$``,
    thousands separators and a sign; ``"$1,200.00"`` -> ``"1200"``, ``".5"`` ->
    ``"0.5"``, ``"5.0"`` -> ``"5"``, ``"-3"`` -> ``"-3"``.

    Returns None for a text without any number (and for a non-string). Never raises.
    """
    if not isinstance(text, str):
        return None
    text = text.replace("\u2212", "-")
    for finder in (_after_hashes, _in_boxed, _after_answer_is):
        answer = finder(text)
        if answer is not None:
            return answer
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _numbers_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        with localcontext() as ctx:
            ctx.prec = max(len(a), len(b)) + 10
            return abs(Decimal(a) - Decimal(b)) <= TOLERANCE
    except InvalidOperation:
        return False


def is_correct(completion: str, reference: str) -> bool:
    """Whether the answer extracted from ``completion`` equals the reference answer.

    ``reference`` is a bare number (``"72"``, ``"1,200"``) or a full GSM8K solution
    ending in ``#### <number>``. Numbers are compared numerically within 1e-6.
    False when either side has no extractable number.
    """
    predicted, expected = extract_answer(completion), extract_answer(reference)
    if predicted is None or expected is None:
        return False
    return _numbers_equal(predicted, expected)


# --- prompts ---------------------------------------------------------------------------------------


def _rows(dataset: datasets.Dataset | Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(question, reference answer) pairs from a GSM8K- or MetaMathQA-schema dataset."""
    if isinstance(dataset, datasets.Dataset):
        question_col, answer_col = qa_columns(dataset.column_names)
        return list(zip(dataset[question_col], dataset[answer_col]))
    rows = list(dataset)
    if not rows:
        return []
    question_col, answer_col = qa_columns(list(rows[0].keys()))
    return [(row[question_col], row[answer_col]) for row in rows]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    tokenizer: Any, question: str, shots: Sequence[tuple[str, str]] = (), use_chat_template: bool = False
) -> str:
    """Prompt text for one question, optionally preceded by worked few-shot examples.

    With a chat template, each shot is a user/assistant turn and the question the
    last user turn (plus the generation prompt). Without one, the plain format is
    ``Question: <q>\\nAnswer: <solution>\\n\\n`` per shot, then ``Question: <q>\\nAnswer:``.
    """
    if use_chat_template:
        messages = []
        for shot_question, shot_answer in shots:
            messages += [{"role": "user", "content": shot_question}, {"role": "assistant", "content": shot_answer}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [PLAIN_PROMPT_TEMPLATE.format(question=q) + " " + a + "\n\n" for q, a in shots]
    return "".join(parts) + PLAIN_PROMPT_TEMPLATE.format(question=question)


def clean_completion(text: str) -> str:
    """Cut a completion where a base model starts inventing the next ``Question:``."""
    return text.split("\nQuestion:", 1)[0].strip()


class AnswerCompleteCriteria(StoppingCriteria):
    """Stops a sequence once its final-answer line is complete or a new question starts.

    A line holding ``####`` or ``The answer is`` and a digit, followed by a newline,
    is a complete answer; ``\\nQuestion:`` means a base model moved on to the next
    example. EOS is handled by ``generate`` itself. Only the last ``window`` new
    tokens are decoded per step: the criterion runs every step, so a pattern is
    seen as soon as its last token is produced.
    """

    _DONE = re.compile(r"(?:####|the answer is)[^\n]*\d[^\n]*\n|\nQuestion:", re.IGNORECASE)

    def __init__(self, tokenizer: Any, prompt_length: int, window: int = 32):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [bool(self._DONE.search(tail)) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


# --- model state -------------------------------------------------------------------------------------


@contextmanager
def _generation_mode(model: torch.nn.Module, tokenizer: Any) -> Iterator[None]:
    """Eval mode, KV cache on, left padding and a pad token; all restored afterwards.

    Gradient checkpointing is left enabled: transformers' checkpointed layers only
    recompute in training mode, so eval mode alone turns it off for generation and
    the training setup (hooks, use_reentrant choice) stays untouched.
    """
    was_training = model.training
    config = getattr(model, "config", None)
    had_use_cache = hasattr(config, "use_cache")
    use_cache = getattr(config, "use_cache", None)
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    if had_use_cache:
        config.use_cache = True
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        model.train(was_training)
        if had_use_cache:
            config.use_cache = use_cache
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = pad_token


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _greedy_config(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int) -> GenerationConfig:
    """The model's generation config made greedy, with our length, pad and EOS tokens."""
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if isinstance(base, GenerationConfig) else GenerationConfig()
    config.do_sample, config.num_beams = False, 1
    config.temperature = config.top_p = config.top_k = None
    config.max_new_tokens, config.max_length = max_new_tokens, None
    config.use_cache = True
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = _eos_token_ids(model, tokenizer) or None
    return config


# --- distribution ------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def _rank_share(num_items: int, rank: int, world_size: int) -> list[int | None]:
    """Global indices this rank evaluates (strided), padded with None to an equal count.

    Every rank gets ``ceil(num_items / world_size)`` slots so that all ranks run the
    same number of ``generate`` calls; ZeRO-3 needs this because every forward pass
    gathers the partitioned parameters collectively. None slots are dummy prompts
    whose results are dropped.
    """
    share: list[int | None] = list(range(rank, num_items, world_size))
    share += [None] * (math.ceil(num_items / world_size) - len(share))
    return share


def _gather(payload: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [payload]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, payload)
    return gathered


# --- evaluation --------------------------------------------------------------------------------------


def _generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    config: GenerationConfig,
    *,
    add_special_tokens: bool,
    synced_gpus: bool,
) -> list[str]:
    """Greedy completions (prompt removed, cleaned) for one left-padded batch of prompts."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    batch = {key: value.to(_model_device(model)) for key, value in batch.items()}
    prompt_length = batch["input_ids"].shape[1]
    stopping = StoppingCriteriaList([AnswerCompleteCriteria(tokenizer, prompt_length)])
    output = model.generate(
        **batch, generation_config=config, stopping_criteria=stopping, synced_gpus=synced_gpus
    )
    texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
    return [clean_completion(text) for text in texts]


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: datasets.Dataset | Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    num_samples: int | None = None,
    few_shot: int = 0,
    use_chat_template: bool | None = None,
    progress: bool = True,
    num_returned_samples: int = 8,
) -> dict[str, Any]:
    """GSM8K accuracy of ``model`` by batched greedy generation.

    Args:
        model: a transformers causal LM or a ``peft.PeftModel`` wrapping one.
        tokenizer: its tokenizer; padding side and pad token are restored afterwards.
        dataset: rows with ``question``/``answer`` (GSM8K) or ``query``/``response``;
            the reference may be a bare number or a solution ending in ``#### <n>``.
        max_new_tokens: generation budget per question.
        batch_size: prompts per ``generate`` call (per rank).
        num_samples: evaluate only the first ``num_samples`` rows.
        few_shot: prepend this many worked examples from the synthetic train split.
        use_chat_template: None uses the tokenizer's chat template when it has one;
            without a template prompts are ``Question: <q>\\nAnswer:``.
        progress: show a tqdm bar (on rank 0).
        num_returned_samples: how many (question, completion) records to return.

    Returns:
        ``{"accuracy", "num_samples", "num_correct", "samples"}``; ``samples`` holds
        the first ``num_returned_samples`` rows as dicts with ``question``,
        ``completion``, ``reference``, ``prediction``, ``correct``.

    Generation stops at EOS, when the final-answer line is complete, or after
    ``max_new_tokens``. The model's train/eval mode, ``config.use_cache``, and
    gradient-checkpointing setup are left as they were.

    Distributed: with an initialized process group of size > 1, every rank must
    call this. Rows are split strided across ranks; each rank's share is padded
    with dummy prompts to the same number of ``generate`` calls, because under
    DeepSpeed ZeRO-3 each forward gathers parameters collectively and a rank with
    fewer calls would hang the others. With ZeRO-3, ``generate`` also gets
    ``synced_gpus=True`` so ranks keep stepping together until all sequences end.
    Per-row results are gathered with ``all_gather_object``; every rank returns the
    same global result.
    """
    rows = _rows(dataset)
    if num_samples is not None:
        rows = rows[:num_samples]
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    elif use_chat_template and not _has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    shots = _few_shot_examples(few_shot)
    rank, world_size = _world()
    synced_gpus = world_size > 1 and _zero3_enabled()

    share = _rank_share(len(rows), rank, world_size)
    dummy = rows[0][0] if rows else ""
    prompts = [build_prompt(tokenizer, rows[i][0] if i is not None else dummy, shots, use_chat_template)
               for i in share]

    local: list[tuple[int, str]] = []
    with _generation_mode(model, tokenizer), torch.no_grad():
        config = _greedy_config(model, tokenizer, max_new_tokens)
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc="GSM8K eval", disable=not progress or rank != 0):
            completions = _generate_batch(
                model, tokenizer, prompts[start:start + batch_size], config,
                # A rendered chat template already holds BOS; plain prompts get the tokenizer's own.
                add_special_tokens=not use_chat_template, synced_gpus=synced_gpus,
            )
            local += [(i, c) for i, c in zip(share[start:start + batch_size], completions) if i is not None]

    results = _score(rows, local, num_returned_samples)
    return _merge(_gather(results, world_size), num_returned_samples)


def _few_shot_examples(few_shot: int) -> list[tuple[str, str]]:
    if few_shot <= 0:
        return []
    shots = make_gsm8k_dataset(few_shot, seed=1234, split="train")
    return list(zip(shots["question"], shots["answer"]))


def _score(rows: list[tuple[str, str]], local: list[tuple[int, str]], num_returned: int) -> dict[str, Any]:
    """Per-rank tally: correct count, row count, and the sample records for low indices."""
    num_correct, samples = 0, []
    for index, completion in local:
        question, reference = rows[index]
        correct = is_correct(completion, reference)
        num_correct += correct
        if index < num_returned:
            samples.append({
                "index": index, "question": question, "completion": completion,
                "reference": reference, "prediction": extract_answer(completion), "correct": correct,
            })
    return {"num_correct": num_correct, "num_samples": len(local), "samples": samples}


def _merge(per_rank: list[dict[str, Any]], num_returned: int) -> dict[str, Any]:
    num_correct = sum(r["num_correct"] for r in per_rank)
    num_samples = sum(r["num_samples"] for r in per_rank)
    samples = sorted((s for r in per_rank for s in r["samples"]), key=lambda s: s["index"])[:num_returned]
    for sample in samples:
        del sample["index"]
    return {
        "accuracy": num_correct / num_samples if num_samples else 0.0,
        "num_samples": num_samples,
        "num_correct": num_correct,
        "samples": samples,
    }


# --- evaluation data ---------------------------------------------------------------------------------


def load_gsm8k_eval_dataset(name_or_path: str | None = None, num_samples: int | None = None) -> datasets.Dataset:
    """GSM8K-schema evaluation data (``question``, ``answer``).

    Args:
        name_or_path: None for the package's synthetic GSM8K test split (disjoint
            from the synthetic train split; 200 rows unless ``num_samples``); a local
            ``.json``/``.jsonl`` file; ``"openai/gsm8k"`` for the real test split
            (``main`` config); any other hub name loads its ``test`` split.
        num_samples: keep the first ``num_samples`` rows.

    Raises:
        ValueError: the data lacks ``question``/``answer`` (or ``query``/``response``).
    """
    if name_or_path is None or name_or_path == "synthetic":
        return make_gsm8k_dataset(DEFAULT_EVAL_SIZE if num_samples is None else num_samples, split="test")
    if name_or_path.endswith((".json", ".jsonl")) and os.path.isfile(name_or_path):
        dataset = datasets.load_dataset("json", data_files=name_or_path, split="train")
    elif name_or_path == "openai/gsm8k":
        dataset = datasets.load_dataset("openai/gsm8k", "main", split="test")
    else:
        dataset = datasets.load_dataset(name_or_path, split="test")
    qa_columns(dataset.column_names)
    if num_samples is not None:
        dataset = dataset.select(range(min(num_samples, len(dataset))))
    return dataset


def write_samples_jsonl(samples: Sequence[Mapping[str, Any]], path: str) -> None:
    """Write sample records one JSON object per line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
