"""Accuracy with its uncertainty: 95% intervals for one run, for a before/after pair, over seeds.

    python benchmarks/accuracy_stats.py RUN_DIR [--task gsm8k]

reads the samples files an in-loop evaluation wrote (``<task>_samples_step<N>.jsonl``) and prints,
for the first and the last evaluation, strict and flexible accuracy with Wilson 95% intervals, the
paired difference (same problems) with its 95% interval, and strict accuracy by the number of
steps of the reference solution (its lines before ``#### N``: the curriculum's levels).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

Z95 = 1.959964
# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (beyond: the normal's).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion ``correct / total`` (``(0, 1)`` without rows)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + Z95**2 / total
    centre = (p + Z95**2 / (2 * total)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(before: list[bool], after: list[bool]) -> tuple[float, float, float]:
    """Difference of two accuracies on the same problems and its 95% interval (normal, paired).

    Only the problems that changed count: ``gained`` right after but not before, ``lost`` the
    reverse; the variance is that of the mean of per-problem differences.
    """
    if len(before) != len(after):
        raise ValueError(f"paired rows differ in number: {len(before)} and {len(after)}")
    n = len(before)
    if n == 0:
        return 0.0, -1.0, 1.0
    gained = sum(a and not b for b, a in zip(before, after))
    lost = sum(b and not a for b, a in zip(before, after))
    diff = (gained - lost) / n
    variance = ((gained + lost) / n - diff**2) / max(n - 1, 1)
    half = Z95 * math.sqrt(max(variance, 0.0))
    return diff, diff - half, diff + half


def mean_interval(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample std and the t-based 95% interval of the mean, over seeds."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0, float("nan"), float("nan")
    std = statistics.stdev(values)
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else Z95
    half = t * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def read_samples(run_dir: Path, task: str = "gsm8k") -> dict[int, list[dict]]:
    """Every evaluation's sample records in ``run_dir``, by step."""
    pattern = re.compile(rf"{re.escape(task)}_samples_step(\d+)\.jsonl$")
    found = {}
    for path in run_dir.glob(f"{task}_samples_step*.jsonl"):
        match = pattern.search(path.name)
        if match:
            found[int(match.group(1))] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return dict(sorted(found.items()))


def describe_run(run_dir: Path, task: str = "gsm8k") -> str:
    """First and last evaluation of a run, with intervals, as text."""
    evaluations = read_samples(run_dir, task)
    if not evaluations:
        raise ValueError(f"{run_dir} holds no {task}_samples_step*.jsonl: was the run evaluated?")
    first, last = min(evaluations), max(evaluations)
    lines = []
    for key, label in (("correct", "strict"), ("correct_flexible", "flexible")):
        before = [bool(r[key]) for r in evaluations[first]]
        after = [bool(r[key]) for r in evaluations[last]]
        for step, rows in ((first, before), (last, after)):
            low, high = wilson_interval(sum(rows), len(rows))
            lines.append(f"{label:8s} step {step:5d}: {sum(rows):3d}/{len(rows)} = {sum(rows) / len(rows):6.1%}"
                         f"  (95% CI {low:.1%}..{high:.1%})")
        if len(before) == len(after):
            diff, low, high = paired_difference(before, after)
            lines.append(f"{label:8s} change    : {100 * diff:+.1f} points  (paired 95% CI {100 * low:+.1f}..{100 * high:+.1f})")
    lines.append("strict accuracy by reference steps (first -> last evaluation):")
    for steps, rows in sorted(_by_steps(evaluations[first], evaluations[last]).items()):
        before, after = zip(*rows)
        lines.append(f"  {steps} step{'s' if steps != 1 else ''}: {sum(before)}/{len(rows)} -> {sum(after)}/{len(rows)}")
    return "\n".join(lines)


def reference_steps(reference: str) -> int:
    """Lines of a worked solution before its ``#### N`` line."""
    return sum(1 for line in str(reference).splitlines() if line.strip() and not line.lstrip().startswith("####"))


def _by_steps(first: list[dict], last: list[dict]) -> dict[int, list[tuple[bool, bool]]]:
    groups: dict[int, list[tuple[bool, bool]]] = {}
    for before, after in zip(first, last):
        groups.setdefault(reference_steps(before.get("reference", "")), []).append(
            (bool(before["correct"]), bool(after["correct"]))
        )
    return groups


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--task", default="gsm8k")
    args = parser.parse_args(argv)
    try:
        print(describe_run(args.run_dir, args.task))
    except (ValueError, OSError, json.JSONDecodeError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
