"""Synthetic GSM8K-style data and SFT dataset loading, all offline and seeded.

The generators produce multi-step arithmetic word problems (shopping, rates,
sharing, percentages, ages, wages) with worked solutions, in two schemas:

- GSM8K: ``{"question", "answer"}``, the answer a worked solution with
  ``<<a*b=c>>`` calculator annotations ending in ``#### <answer>``.
- MetaMathQA: ``{"query", "response"}``, the response ending in
  ``The answer is: <answer>``.

Train and test splits are disjoint by construction: a problem belongs to the
test split when a hash of its question text falls in a fixed bucket, so no
question can ever be generated for both splits, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import datasets

# Fraction of all possible problems that belongs to the test split (by hash bucket).
TEST_BUCKETS = 2
NUM_BUCKETS = 10
DEFAULT_SYNTHETIC_SIZE = 1000
PLAIN_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

_NAMES = [
    "Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal",
    "Kira", "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara",
]
_ITEMS = [
    ("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"), ("book", "books"),
    ("toy car", "toy cars"), ("mug", "mugs"), ("sticker", "stickers"), ("candle", "candles"),
]
_TREATS = ["cookies", "marbles", "stickers", "cards", "candies", "beads"]
_MACHINES = [("printer", "pages"), ("bakery oven", "loaves"), ("factory line", "bottles"), ("robot", "boxes")]
_CLOTHES = ["jacket", "pair of shoes", "shirt", "backpack", "lamp", "board game"]
_JOBS = ["tutoring", "walking dogs", "working at a cafe", "babysitting", "mowing lawns"]


@dataclass(frozen=True)
class Step:
    """One reasoning step: a sentence and the calculation ``left = result`` it performs."""

    text: str
    left: str
    result: Fraction


@dataclass(frozen=True)
class Problem:
    """A word problem with its reasoning steps; the last step's result is the answer."""

    question: str
    steps: tuple[Step, ...]

    @property
    def answer(self) -> Fraction:
        return self.steps[-1].result


def format_number(value: Fraction | int) -> str:
    """Write a number the way GSM8K does: ``12``, ``8.5``, ``-3`` (no trailing zeros)."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return text


def _step(text: str, left: str, result: Fraction | int) -> Step:
    return Step(text=text, left=left, result=Fraction(result))


# --- problem templates -------------------------------------------------------------------------
# Each template draws its parameters from `rng` and returns a Problem with 2-4 steps.


def _shopping(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    (item1, items1), (item2, items2) = rng.sample(_ITEMS, 2)
    n1, p1, n2, p2 = rng.randint(2, 9), rng.randint(2, 25), rng.randint(2, 9), rng.randint(2, 25)
    cost1, cost2 = n1 * p1, n2 * p2
    total = cost1 + cost2
    bill = (total // 50 + 1) * 50
    question = (
        f"{name} buys {n1} {items1} for ${p1} each and {n2} {items2} for ${p2} each. "
        f"{name} pays with ${bill}. How much change does {name} get back, in dollars?"
    )
    return Problem(question, (
        _step(f"The {items1} cost", f"{n1}*{p1}", cost1),
        _step(f"The {items2} cost", f"{n2}*{p2}", cost2),
        _step("Altogether that is", f"{cost1}+{cost2}", total),
        _step("So the change is", f"{bill}-{total}", bill - total),
    ))


def _machine_rate(rng: random.Random) -> Problem:
    machine, units = rng.choice(_MACHINES)
    rate, hours, days = rng.randint(3, 60), rng.randint(2, 12), rng.randint(2, 7)
    per_day = rate * hours
    question = (
        f"A {machine} makes {rate} {units} per hour. It runs for {hours} hours every day. "
        f"How many {units} does it make in {days} days?"
    )
    return Problem(question, (
        _step("Each day it makes", f"{rate}*{hours}", per_day),
        _step(f"In {days} days it makes", f"{per_day}*{days}", per_day * days),
    ))


def _travel(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    v1, t1, v2, t2 = rng.randint(20, 90), rng.randint(1, 6), rng.randint(5, 60), rng.randint(1, 5)
    d1, d2 = v1 * t1, v2 * t2
    question = (
        f"{name} drives at {v1} miles per hour for {t1} hours, then at {v2} miles per hour "
        f"for {t2} more hours. How many miles does {name} travel in total?"
    )
    return Problem(question, (
        _step("The first part is", f"{v1}*{t1}", d1),
        _step("The second part is", f"{v2}*{t2}", d2),
        _step("In total that is", f"{d1}+{d2}", d1 + d2),
    ))


def _sharing(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    treat = rng.choice(_TREATS)
    bags, per_bag, friends = rng.randint(2, 6), rng.randint(6, 30), rng.randint(2, 9)
    total = bags * per_bag
    each = rng.randint(1, (total - 1) // friends)
    kept = total - friends * each
    question = (
        f"{name} has {bags} bags with {per_bag} {treat} in each. {name} keeps {kept} {treat} and shares "
        f"the rest equally among {friends} friends. How many {treat} does each friend get?"
    )
    return Problem(question, (
        _step(f"{name} has", f"{bags}*{per_bag}", total),
        _step("After keeping some, there are", f"{total}-{kept}", total - kept),
        _step("Each friend gets", f"{total - kept}/{friends}", each),
    ))


def _discount(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    thing = rng.choice(_CLOTHES)
    price = rng.choice([10, 12, 15, 18, 20, 24, 25, 30, 40, 45, 50, 60, 75, 80, 120])
    percent = rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
    count = rng.randint(2, 5)
    off = Fraction(price * percent, 100)
    sale = price - off
    question = (
        f"A {thing} costs ${price}. It is on sale for {percent}% off. "
        f"How much does {name} pay for {count} of them, in dollars?"
    )
    return Problem(question, (
        _step("The discount is", f"{price}*{percent}/100", off),
        _step("The sale price is", f"{price}-{format_number(off)}", sale),
        _step(f"For {count} of them {name} pays", f"{format_number(sale)}*{count}", sale * count),
    ))


def _ages(rng: random.Random) -> Problem:
    a, b, c = rng.sample(_NAMES, 3)
    age_c, factor, gap, years = rng.randint(2, 12), rng.randint(2, 4), rng.randint(1, 9), rng.randint(2, 10)
    age_b = age_c * factor
    age_a = age_b + gap
    question = (
        f"{b} is {factor} times as old as {c}, who is {age_c}. {a} is {gap} years older than {b}. "
        f"How old will {a} be in {years} years?"
    )
    return Problem(question, (
        _step(f"{b} is", f"{age_c}*{factor}", age_b),
        _step(f"{a} is", f"{age_b}+{gap}", age_a),
        _step(f"In {years} years {a} will be", f"{age_a}+{years}", age_a + years),
    ))


def _wages(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    job = rng.choice(_JOBS)
    wage, hours, weeks = rng.randint(8, 30), rng.randint(3, 20), rng.randint(2, 8)
    weekly = wage * hours
    earned = weekly * weeks
    spent = rng.randint(1, earned - 1)
    question = (
        f"{name} earns ${wage} an hour {job} and works {hours} hours a week. After {weeks} weeks, "
        f"{name} spends ${spent} on a bike. How many dollars does {name} have left?"
    )
    return Problem(question, (
        _step("Each week", f"{wage}*{hours}", weekly),
        _step(f"In {weeks} weeks", f"{weekly}*{weeks}", earned),
        _step("After the bike", f"{earned}-{spent}", earned - spent),
    ))


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _shopping, _machine_rate, _travel, _sharing, _discount, _ages, _wages,
)


# --- splitting and sampling ----------------------------------------------------------------------


def question_split(question: str) -> str:
    """Return ``"test"`` or ``"train"`` for a question, from a stable hash of its text."""
    bucket = int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % NUM_BUCKETS
    return "test" if bucket < TEST_BUCKETS else "train"


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def sample_problems(num_samples: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """Draw ``num_samples`` distinct problems of one split, deterministically for a seed.

    Templates are cycled so every template is represented; a candidate is kept only
    if its question hashes into the requested split and was not drawn before.
    """
    _check_split(split)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    rng = random.Random(f"dude_trl-synthetic-{split}-{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * num_samples + 1000
    while len(problems) < num_samples:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"could only draw {len(problems)} distinct {split} problems")
        problem = TEMPLATES[len(problems) % len(TEMPLATES)](rng)
        if problem.question in seen or question_split(problem.question) != split:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def gsm8k_solution(problem: Problem) -> str:
    """Worked solution in GSM8K style: calculator annotations and a final ``#### <answer>`` line."""
    lines = [
        f"{step.text} {step.left} = <<{step.left}={format_number(step.result)}>>{format_number(step.result)}."
        for step in problem.steps
    ]
    return "\n".join(lines) + f"\n#### {format_number(problem.answer)}"


def metamath_solution(problem: Problem) -> str:
    """Worked solution in MetaMathQA style, ending in ``The answer is: <answer>``."""
    lines = [f"{step.text} {step.left} = {format_number(step.result)}." for step in problem.steps]
    return " ".join(lines) + f"\nThe answer is: {format_number(problem.answer)}"


def make_gsm8k_dataset(num_samples: int, seed: int = 0, split: str = "train") -> datasets.Dataset:
    """Synthetic GSM8K-schema dataset (``question``, ``answer``) of ``num_samples`` problems."""
    problems = sample_problems(num_samples, seed=seed, split=split)
    return datasets.Dataset.from_dict({
        "question": [p.question for p in problems],
        "answer": [gsm8k_solution(p) for p in problems],
    })


def make_metamath_dataset(num_samples: int, seed: int = 0, split: str = "train") -> datasets.Dataset:
    """Synthetic MetaMathQA-schema dataset (``query``, ``response``) of ``num_samples`` problems."""
    problems = sample_problems(num_samples, seed=seed, split=split)
    return datasets.Dataset.from_dict({
        "query": [p.question for p in problems],
        "response": [metamath_solution(p) for p in problems],
    })


# --- SFT formatting ------------------------------------------------------------------------------

_SCHEMAS = (("question", "answer"), ("query", "response"))


def qa_columns(column_names: list[str]) -> tuple[str, str]:
    """Return the (question, answer) column pair of a GSM8K- or MetaMathQA-schema dataset.

    Raises:
        ValueError: naming the columns present and the pairs expected.
    """
    for question_col, answer_col in _SCHEMAS:
        if question_col in column_names and answer_col in column_names:
            return question_col, answer_col
    expected = " or ".join(f"({q!r}, {a!r})" for q, a in _SCHEMAS)
    raise ValueError(f"dataset has columns {sorted(column_names)}; expected the fields {expected}")


def to_sft_format(
    dataset: datasets.Dataset, style: str = "prompt_completion", conversational: bool = True
) -> datasets.Dataset:
    """Convert a GSM8K- or MetaMathQA-schema dataset to a format TRL's ``SFTTrainer`` accepts.

    Args:
        dataset: columns ``question``/``answer`` or ``query``/``response``.
        style: ``"prompt_completion"`` gives ``prompt``/``completion`` columns (the loss
            covers the completion only); ``"messages"`` gives one ``messages`` column.
        conversational: with True, prompt and completion are lists of chat messages
            (the tokenizer's chat template is applied by TRL). With False (only for
            ``prompt_completion``), plain strings in the ``Question: ...\\nAnswer:``
            format that ``dude_trl.gsm8k.evaluate`` uses for models without a chat template.
    """
    question_col, answer_col = qa_columns(dataset.column_names)
    if style not in ("prompt_completion", "messages"):
        raise ValueError(f"style must be 'prompt_completion' or 'messages', got {style!r}")
    if style == "messages" and not conversational:
        raise ValueError("style='messages' is always conversational")

    def convert(example: dict) -> dict:
        question, answer = example[question_col], example[answer_col]
        if style == "messages":
            return {"messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]}
        if conversational:
            return {
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        return {"prompt": PLAIN_PROMPT_TEMPLATE.format(question=question), "completion": " " + answer}

    return dataset.map(convert, remove_columns=dataset.column_names)


def _is_local_json(name: str) -> bool:
    return name.endswith((".json", ".jsonl")) and os.path.isfile(name)


def load_sft_dataset(
    name: str | None,
    split: str = "train",
    num_samples: int | None = None,
    seed: int = 0,
    style: str = "prompt_completion",
    conversational: bool = True,
) -> datasets.Dataset:
    """Load a math SFT dataset and convert it with :func:`to_sft_format`.

    Args:
        name: ``None`` or ``"synthetic"`` for synthetic MetaMathQA-style data
            (``num_samples`` problems, default 1000); a local ``.json``/``.jsonl``
            file; otherwise a hub dataset name such as ``"meta-math/MetaMathQA"``.
        split: split to load (synthetic data has ``train`` and ``test``; a local
            file has a single split, read whatever this says).
        num_samples: keep this many examples, after a seeded shuffle for file/hub data.
        seed: generator seed for synthetic data, shuffle seed otherwise.
    """
    if name is None or name == "synthetic":
        raw = make_metamath_dataset(DEFAULT_SYNTHETIC_SIZE if num_samples is None else num_samples, seed, split)
    else:
        if _is_local_json(name):
            raw = datasets.load_dataset("json", data_files=name, split="train")
        else:
            raw = datasets.load_dataset(name, split=split)
        if num_samples is not None:
            raw = raw.shuffle(seed=seed).select(range(min(num_samples, len(raw))))
    return to_sft_format(raw, style=style, conversational=conversational)
