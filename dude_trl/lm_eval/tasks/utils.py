"""Target and filters of the ``gsm8k_local`` tasks: dude_trl's in-loop reading of a completion.

lm-evaluation-harness generates until EOS or ``until``; the in-loop evaluator also stops at the
first complete final-answer line. Greedy decoding makes the in-loop completion a prefix of
lm-eval's, so each response is first cut where the in-loop evaluator stops, then cleaned and read
as it reads it. Answers are normalised numbers; an unreadable one becomes ``[invalid]``.
"""

from dude_trl.eval.gsm8k import clean_completion, cut_at_answer_end, last_number, reference_answer, strict_answer

INVALID = "[invalid]"


def target(doc: dict) -> str:
    """The reference's number, normalised (``""`` if it has none, which no answer equals)."""
    return reference_answer(doc["answer"]) or ""


def in_loop_completion(response: str) -> str:
    """What the in-loop evaluator scores of an lm-eval response."""
    return clean_completion(cut_at_answer_end(response))


def _read(responses: list[list[str]], reader) -> list[list[str]]:
    return [[reader(in_loop_completion(r)) or INVALID for r in per_doc] for per_doc in responses]


def strict_answers(responses: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return _read(responses, strict_answer)


def flexible_answers(responses: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return _read(responses, last_number)
