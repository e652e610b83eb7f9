"""Synthetic GSM8K-style word problems with exact answers, generated offline and seeded.

Two sets of problems, chosen by name:

- ``"synthetic"``: multi-step problems (shopping, rates, sharing, percentages, ages,
  wages) with two- and three-digit arithmetic, in the style of GSM8K.
- ``"curriculum"``: a graded curriculum of one-step, two-step and three-step problems
  with small numbers, in equal parts. A 135M-parameter model learns it within minutes
  on a CPU, so its accuracy visibly moves during a short run (the offline demo's task).

Each problem is written in two schemas:

- GSM8K: ``{"question", "answer"}``, the answer a worked solution ending in
  ``#### <answer>`` (with ``<<a*b=c>>`` calculator annotations for ``"synthetic"``).
- MetaMathQA: ``{"query", "response"}``, the response ending in ``The answer is: <answer>``.

Train and test splits are disjoint by construction: a problem belongs to the
test split when a hash of its question text falls in a fixed bucket, so no
question can ever be generated for both splits, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import datasets

# Fraction of all possible problems that belongs to the test split (by hash bucket).
TEST_BUCKETS = 2
NUM_BUCKETS = 10
DEFAULT_SYNTHETIC_SIZE = 1000

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


# --- the graded curriculum ---------------------------------------------------------------------
# Small numbers (sums below 100, products of one-digit and low two-digit factors), one idea a step.


def _gets_more(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    question = f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?"
    return Problem(question, (_step(f"{name} has", f"{a}+{b}", a + b),))


def _gives_away(rng: random.Random) -> Problem:
    name, treat = rng.choice(_NAMES), rng.choice(_TREATS)
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    question = f"{name} has {a} {treat} and gives {b} of them to a friend. How many {treat} does {name} have left?"
    return Problem(question, (_step(f"{name} has", f"{a}-{b}", a - b),))


def _boxes(rng: random.Random) -> Problem:
    (_, items), a, b = rng.choice(_ITEMS), rng.randint(2, 12), rng.randint(2, 9)
    question = f"Each box holds {a} {items}. How many {items} are in {b} boxes?"
    return Problem(question, (_step(f"{b} boxes hold", f"{a}*{b}", a * b),))


def _shares(rng: random.Random) -> Problem:
    name, treat = rng.choice(_NAMES), rng.choice(_TREATS)
    friends, each = rng.randint(2, 9), rng.randint(2, 10)
    question = (
        f"{name} shares {friends * each} {treat} equally among {friends} friends. "
        f"How many {treat} does each friend get?"
    )
    return Problem(question, (_step("Each friend gets", f"{friends * each}/{friends}", each),))


def _buys_then_gives(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(3, 30), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    question = (
        f"{name} has {a} {items}, buys {b} more, and then gives {c} away. "
        f"How many {items} does {name} have now?"
    )
    return Problem(question, (
        _step(f"After buying, {name} has", f"{a}+{b}", a + b),
        _step(f"After giving some away, {name} has", f"{a + b}-{c}", a + b - c),
    ))


def _boxes_and_loose(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, per_box, loose = rng.randint(2, 9), rng.randint(2, 10), rng.randint(1, 20)
    question = (
        f"{name} has {boxes} boxes with {per_box} {items} in each, and {loose} more {items} outside the boxes. "
        f"How many {items} does {name} have in total?"
    )
    return Problem(question, (
        _step("The boxes hold", f"{boxes}*{per_box}", boxes * per_box),
        _step("In total there are", f"{boxes * per_box}+{loose}", boxes * per_box + loose),
    ))


def _change(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(_NAMES), rng.choice(_ITEMS)
    count, price = rng.randint(2, 6), rng.randint(2, 9)
    cost = count * price
    bill = (cost // 10 + 1) * 10
    question = f"{name} buys {count} {items} for ${price} each and pays with ${bill}. How much change does {name} get?"
    return Problem(question, (
        _step(f"The {items} cost", f"{count}*{price}", cost),
        _step("The change is", f"{bill}-{cost}", bill - cost),
    ))


def _two_purchases(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    (_, items1), (_, items2) = rng.sample(_ITEMS, 2)
    n1, p1, n2, p2 = rng.randint(2, 5), rng.randint(2, 9), rng.randint(2, 5), rng.randint(2, 9)
    question = (
        f"{name} buys {n1} {items1} for ${p1} each and {n2} {items2} for ${p2} each. "
        f"How many dollars does {name} spend?"
    )
    return Problem(question, (
        _step(f"The {items1} cost", f"{n1}*{p1}", n1 * p1),
        _step(f"The {items2} cost", f"{n2}*{p2}", n2 * p2),
        _step("Altogether", f"{n1 * p1}+{n2 * p2}", n1 * p1 + n2 * p2),
    ))


def _weekly_savings(rng: random.Random) -> Problem:
    name = rng.choice(_NAMES)
    earned, spent, weeks = rng.randint(5, 20), rng.randint(1, 4), rng.randint(2, 6)
    spent = min(spent, earned - 1)
    start = rng.randint(1, 20)
    question = (
        f"{name} has ${start}. Every week {name} earns ${earned} and spends ${spent}. "
        f"How many dollars does {name} have after {weeks} weeks?"
    )
    saved = earned - spent
    return Problem(question, (
        _step("Each week", f"{earned}-{spent}", saved),
        _step(f"In {weeks} weeks", f"{saved}*{weeks}", saved * weeks),
        _step(f"{name} has", f"{start}+{saved * weeks}", start + saved * weeks),
    ))


CURRICULUM_LEVELS: dict[int, tuple[Callable[[random.Random], Problem], ...]] = {
    1: (_gets_more, _gives_away, _boxes, _shares),
    2: (_buys_then_gives, _boxes_and_loose, _change),
    3: (_two_purchases, _weekly_savings),
}
# A problem set is a tuple of template groups: problem i comes from group i % len(groups),
# so the curriculum has a third of its problems at each level.
PROBLEM_SETS: dict[str, tuple[tuple[Callable[[random.Random], Problem], ...], ...]] = {
    "synthetic": (TEMPLATES,),
    "curriculum": tuple(CURRICULUM_LEVELS.values()),
}


# --- splitting and sampling ----------------------------------------------------------------------


def question_split(question: str) -> str:
    """Return ``"test"`` or ``"train"`` for a question, from a stable hash of its text."""
    bucket = int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % NUM_BUCKETS
    return "test" if bucket < TEST_BUCKETS else "train"


def _check_args(split: str, problem_set: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if problem_set not in PROBLEM_SETS:
        raise ValueError(f"unknown synthetic problem set {problem_set!r}; choose one of {sorted(PROBLEM_SETS)}")


def sample_problems(
    num_samples: int, seed: int = 0, split: str = "train", problem_set: str = "synthetic"
) -> list[Problem]:
    """Draw ``num_samples`` distinct problems of one split, deterministically for a seed.

    Template groups, and templates within a group, are cycled so that every template
    is represented; a candidate is kept only if its question hashes into the requested
    split and was not drawn before.
    """
    _check_args(split, problem_set)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    groups = PROBLEM_SETS[problem_set]
    # The "synthetic" set keeps the seed string it always had, so its problems are unchanged.
    prefix = "dude_trl-synthetic" if problem_set == "synthetic" else f"dude_trl-{problem_set}"
    rng = random.Random(f"{prefix}-{split}-{seed}")
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * num_samples + 1000
    while len(problems) < num_samples:
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"could only draw {len(problems)} distinct {split} problems")
        index = len(problems)
        group = groups[index % len(groups)]
        problem = group[(index // len(groups)) % len(group)](rng)
        if problem.question in seen or question_split(problem.question) != split:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def gsm8k_solution(problem: Problem, calculator: bool = True) -> str:
    """Worked solution in GSM8K style, ending in a ``#### <answer>`` line.

    With ``calculator``, each step carries GSM8K's ``<<a*b=c>>`` annotation.
    """
    lines = []
    for step in problem.steps:
        result = format_number(step.result)
        annotation = f"<<{step.left}={result}>>" if calculator else ""
        lines.append(f"{step.text} {step.left} = {annotation}{result}.")
    return "\n".join(lines) + f"\n#### {format_number(problem.answer)}"


def metamath_solution(problem: Problem) -> str:
    """Worked solution in MetaMathQA style, ending in ``The answer is: <answer>``."""
    lines = [f"{step.text} {step.left} = {format_number(step.result)}." for step in problem.steps]
    return " ".join(lines) + f"\nThe answer is: {format_number(problem.answer)}"


def make_gsm8k_dataset(
    num_samples: int, seed: int = 0, split: str = "train", problem_set: str = "synthetic"
) -> datasets.Dataset:
    """GSM8K-schema dataset (``question``, ``answer``) of ``num_samples`` synthetic problems.

    The curriculum's solutions leave out the calculator annotations, which a small
    model would otherwise have to learn as well.
    """
    problems = sample_problems(num_samples, seed=seed, split=split, problem_set=problem_set)
    calculator = problem_set == "synthetic"
    return datasets.Dataset.from_dict({
        "question": [p.question for p in problems],
        "answer": [gsm8k_solution(p, calculator=calculator) for p in problems],
    })


def make_metamath_dataset(
    num_samples: int, seed: int = 0, split: str = "train", problem_set: str = "synthetic"
) -> datasets.Dataset:
    """MetaMathQA-schema dataset (``query``, ``response``) of ``num_samples`` synthetic problems."""
    problems = sample_problems(num_samples, seed=seed, split=split, problem_set=problem_set)
    return datasets.Dataset.from_dict({
        "query": [p.question for p in problems],
        "response": [metamath_solution(p) for p in problems],
    })
