"""Problem by problem: does lm-evaluation-harness score what the in-loop evaluator scored?

Both evaluators write one record per problem (the in-loop ``gsm8k_samples_step<N>.jsonl``, and
`harness.problem_records`) with the same fields. `compare` pairs them by question and reports the
accuracy each measured, and every problem where they differ: in correctness (strict or flexible),
in the prompt the model saw, or in the completion it gave. With the same prompt and greedy
decoding, a difference in completion means the two models computed different things (or a
near-tie flipped by batch numerics); a difference in correctness with equal completions would
mean the scoring differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .harness import accuracy

_FIELDS = ("prompt", "completion", "correct", "correct_flexible")


def compare(in_loop: Sequence[Mapping[str, Any]], lm_eval: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The agreement of two lists of per-problem records, paired by question (in order for repeats).

    Returns ``{"problems", "unmatched", "in_loop", "lm_eval", "disagreements", "differences"}``:
    the number of paired problems, the in-loop questions lm-eval did not score, each side's
    accuracy on the paired problems, the count of problems that differ in strict or flexible
    correctness, and one entry per differing problem (``question``, the fields that differ, and
    both sides' completion and predictions).
    """
    pending: dict[str, list[Mapping[str, Any]]] = {}
    for record in lm_eval:
        pending.setdefault(record["question"], []).append(record)
    pairs, unmatched = [], 0
    for record in in_loop:
        candidates = pending.get(record["question"])
        if candidates:
            pairs.append((record, candidates.pop(0)))
        else:
            unmatched += 1
    differences = []
    for ours, theirs in pairs:
        fields = [name for name in _FIELDS if ours.get(name) != theirs.get(name)]
        if fields:
            differences.append({
                "question": ours["question"], "differs_in": fields,
                "in_loop": {k: ours.get(k) for k in ("completion", "prediction", "prediction_flexible")},
                "lm_eval": {k: theirs.get(k) for k in ("completion", "prediction", "prediction_flexible")},
            })
    disagreements = sum(
        bool({"correct", "correct_flexible"} & set(entry["differs_in"])) for entry in differences
    )
    return {
        "problems": len(pairs),
        "unmatched": unmatched,
        "in_loop": accuracy([ours for ours, _ in pairs]),
        "lm_eval": accuracy([theirs for _, theirs in pairs]),
        "disagreements": disagreements,
        "differences": differences,
    }


def summary(agreement: Mapping[str, Any], max_listed: int = 10) -> str:
    """A few lines for the terminal: both accuracies, the disagreements, and the first differing problems."""
    ours, theirs = agreement["in_loop"], agreement["lm_eval"]
    lines = [
        f"Agreement with the in-loop evaluator on {agreement['problems']} problems"
        + (f" ({agreement['unmatched']} in-loop problems not scored by lm-eval)" if agreement["unmatched"] else "")
        + ":",
        f"  in-loop  strict {100 * ours['accuracy']:.1f}%  flexible {100 * ours['accuracy_flexible']:.1f}%",
        f"  lm-eval  strict {100 * theirs['accuracy']:.1f}%  flexible {100 * theirs['accuracy_flexible']:.1f}%",
        f"  problems scored differently: {agreement['disagreements']}; differing in prompt or completion: "
        f"{len(agreement['differences'])}",
    ]
    for entry in agreement["differences"][:max_listed]:
        lines.append(f"  - {entry['question'][:70]!r} differs in {', '.join(entry['differs_in'])}")
        lines.append(f"      in-loop: {entry['in_loop']['completion'][:100]!r}")
        lines.append(f"      lm-eval: {entry['lm_eval']['completion'][:100]!r}")
    return "\n".join(lines)
