"""GSM8K as an evaluation task: answer extraction, scoring, prompts, stopping and data.

Two readings of a completion are scored, as lm-evaluation-harness's gsm8k task does.
``accuracy`` (strict) takes the answer after the final-answer marker (``#### N``, and
also ``\\boxed{N}`` or ``The answer is N``); a completion without one is wrong.
``accuracy_flexible`` takes the last number anywhere in the completion. Both compare
numerically with the reference, a number or a full solution ending in ``#### N``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

import datasets
import torch
from transformers import StoppingCriteria

from ..data import PLAIN_PROMPT_TEMPLATE, is_local_json, load_qa_dataset, qa_columns
from ..synthetic import PROBLEM_SETS, make_gsm8k_dataset
from .task import EvalTask

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


_LEADING_FRACTION = re.compile(r"\$?\s*(-?\d{1,18})\s*/\s*(\d{1,18})(?![\d.,/])")


def _first_number_on_line(text: str) -> str | None:
    """First number on the first non-empty line of ``text``; a leading ``a/b`` counts as its value."""
    stripped = text.lstrip()
    line = stripped.split("\n", 1)[0]
    fraction = _LEADING_FRACTION.match(line)
    if fraction:
        return _fraction_value(fraction.group(1), fraction.group(2))
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
    answer = strict_answer(text)
    return answer if answer is not None else last_number(text)


def strict_answer(text: str) -> str | None:
    """The number after a final-answer marker (``####``, ``\\boxed{}``, ``The answer is``), or None.

    The strict reading of a completion: as :func:`extract_answer`, without its fallback to
    the last number, so a completion that never states its final answer is wrong.
    Never raises.
    """
    if not isinstance(text, str):
        return None
    text = text.replace("\u2212", "-")
    for finder in (_after_hashes, _in_boxed, _after_answer_is):
        answer = finder(text)
        if answer is not None:
            return answer
    return None


def _numbers_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        with localcontext() as ctx:
            ctx.prec = max(len(a), len(b)) + 10
            return abs(Decimal(a) - Decimal(b)) <= TOLERANCE
    except InvalidOperation:
        return False


def reference_answer(reference: str | int | float) -> str | None:
    """The answer of a reference: a number (``72``, ``"1,200"``) or a solution ending in ``#### N``."""
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return normalize_number(format(Decimal(str(reference)), "f"))
    return extract_answer(reference)


def is_correct(completion: str, reference: str | int | float) -> bool:
    """Strict scoring: whether the final answer ``completion`` states equals the reference answer.

    The completion's answer is :func:`strict_answer` (after ``####``, ``\\boxed{}`` or ``The
    answer is``); a completion without one is wrong, as in lm-evaluation-harness's
    ``strict-match``. ``reference`` is a bare number (``"72"``, ``"1,200"``, ``5``) or a full
    GSM8K solution ending in ``#### <number>``. Numbers are compared numerically within 1e-6.
    False when either side has no number.
    """
    predicted, expected = strict_answer(completion), reference_answer(reference)
    if predicted is None or expected is None:
        return False
    return _numbers_equal(predicted, expected)


def last_number(text: str) -> str | None:
    """The last number anywhere in ``text``, normalized: the flexible reading of an answer.

    Returns None for a text without any number (and for a non-string). Never raises.
    """
    if not isinstance(text, str):
        return None
    numbers = _numbers(text.replace("\u2212", "-"))
    return numbers[-1] if numbers else None


def is_correct_flexible(completion: str, reference: str | int | float) -> bool:
    """Flexible scoring: whether the last number of ``completion`` equals the reference answer.

    As lm-evaluation-harness's ``flexible-extract``; see :func:`is_correct` for the reference.
    """
    predicted, expected = last_number(completion), reference_answer(reference)
    if predicted is None or expected is None:
        return False
    return _numbers_equal(predicted, expected)


# --- prompts and stopping ---------------------------------------------------------------------------


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


#: A finished answer: a line holding ``####`` or ``The answer is`` and a digit, ended by a newline,
#: or ``\nQuestion:`` (a base model moving on to the next example).
ANSWER_DONE = re.compile(r"(?:####|the answer is)[^\n]*\d[^\n]*\n|\nQuestion:", re.IGNORECASE)


def cut_at_answer_end(text: str) -> str:
    """``text`` up to where :class:`AnswerCompleteCriteria` stops generating: the end of the first
    :data:`ANSWER_DONE` match (unchanged without one).

    An evaluator that stops on other strings (lm-evaluation-harness stops on EOS and ``until``)
    generates the same greedy tokens further; cutting its output here gives what the in-loop
    evaluator scored.
    """
    match = ANSWER_DONE.search(text)
    return text if match is None else text[:match.end()]


class AnswerCompleteCriteria(StoppingCriteria):
    """Stops a sequence once its final-answer line is complete or a new question starts.

    A line holding ``####`` or ``The answer is`` and a digit, followed by a newline,
    is a complete answer; ``\\nQuestion:`` means a base model moved on to the next
    example. EOS is handled by ``generate`` itself. Only the last ``window`` new
    tokens are decoded per step: the criterion runs every step, so a pattern is
    seen as soon as its last token is produced.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, window: int = 32):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        done = [bool(ANSWER_DONE.search(tail)) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


# --- the task ----------------------------------------------------------------------------------------


class GSM8KTask(EvalTask):
    """GSM8K: rows are (question, reference answer) pairs; metrics ``accuracy`` and ``accuracy_flexible``.

    Args:
        few_shot: prepend this many worked examples from the synthetic train split
            to every prompt.
    """

    name = "gsm8k"
    metrics = ("accuracy", "accuracy_flexible")
    max_new_tokens = 256

    def __init__(self, few_shot: int = 0):
        self.few_shot = few_shot
        self.shots = _few_shot_examples(few_shot)

    def load(
        self, name_or_path: str | None = None, num_samples: int | None = None, split: str | None = None
    ) -> datasets.Dataset:
        """See :func:`load_gsm8k_eval_dataset`."""
        return load_gsm8k_eval_dataset(name_or_path, num_samples=num_samples, split=split)

    def rows(self, dataset: datasets.Dataset | Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
        """(question, reference answer) pairs of a GSM8K- or MetaMathQA-schema dataset or list of dicts."""
        if isinstance(dataset, datasets.Dataset):
            question_col, answer_col = qa_columns(dataset.column_names)
            return list(zip(dataset[question_col], dataset[answer_col]))
        rows = list(dataset)
        if not rows:
            return []
        question_col, answer_col = qa_columns(list(rows[0].keys()))
        return [(row[question_col], row[answer_col]) for row in rows]

    def question(self, row: tuple[str, str]) -> str:
        return row[0]

    def prompt(self, row: tuple[str, str], tokenizer: Any, use_chat_template: bool) -> str:
        return build_prompt(tokenizer, row[0], self.shots, use_chat_template)

    def stopping_criteria(self, tokenizer: Any, prompt_length: int) -> list[StoppingCriteria]:
        return [AnswerCompleteCriteria(tokenizer, prompt_length)]

    def clean(self, completion: str) -> str:
        return clean_completion(completion)

    def score(self, completion: str, row: tuple[str, str]) -> dict[str, float]:
        reference = row[1]
        return {
            "accuracy": is_correct(completion, reference),
            "accuracy_flexible": is_correct_flexible(completion, reference),
        }

    def sample(self, row: tuple[str, str], completion: str, scores: Mapping[str, float]) -> dict[str, Any]:
        question, reference = row
        return {
            "question": question, "completion": completion, "reference": reference,
            "answer": reference_answer(reference),
            "prediction": strict_answer(completion), "correct": bool(scores["accuracy"]),
            "prediction_flexible": last_number(completion), "correct_flexible": bool(scores["accuracy_flexible"]),
        }


def _few_shot_examples(few_shot: int) -> list[tuple[str, str]]:
    if few_shot <= 0:
        return []
    shots = make_gsm8k_dataset(few_shot, seed=1234, split="train")
    return list(zip(shots["question"], shots["answer"]))


# --- evaluation data ---------------------------------------------------------------------------------


def load_gsm8k_eval_dataset(
    name_or_path: str | None = None, num_samples: int | None = None, split: str | None = None
) -> datasets.Dataset:
    """GSM8K-schema evaluation data (``question``, ``answer``).

    Args:
        name_or_path: None or ``"synthetic"`` for the package's synthetic GSM8K test split,
            ``"curriculum"`` for the graded curriculum's test split (both disjoint from their
            train splits; 200 rows unless ``num_samples``); a local ``.json``/``.jsonl`` file;
            ``"openai/gsm8k"`` (``main`` config) or any other hub name.
        num_samples: keep the first ``num_samples`` rows.
        split: which split, slices included (``"test[:100]"``, ``"train[-500:]"``). None: ``test``
            for synthetic and hub data, the whole file for a local file.

    Raises:
        ValueError: the data lacks ``question``/``answer`` (or ``query``/``response``), or a
            local file was asked for a split other than ``train``.
    """
    if name_or_path is None or name_or_path in PROBLEM_SETS:
        size = DEFAULT_EVAL_SIZE if num_samples is None else num_samples
        return make_gsm8k_dataset(size, split=split or "test", problem_set=name_or_path or "synthetic")
    if split is None:
        split = "train" if is_local_json(name_or_path) else "test"
    dataset = load_qa_dataset(name_or_path, split)
    if num_samples is not None:
        dataset = dataset.select(range(min(num_samples, len(dataset))))
    return dataset
