"""Synthetic GSM8K/MetaMathQA data: schema, arithmetic, determinism, disjoint splits, SFT formats."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import pytest
from trl.data_utils import is_conversational

from dude_trl.data import (
    GSM8K_DEV_SPLIT,
    GSM8K_TRAIN_SPLIT,
    check_disjoint,
    load_qa_dataset,
    load_sft_dataset,
    to_sft_format,
    training_questions,
)
from dude_trl.gsm8k import load_gsm8k_eval_dataset
from dude_trl.synthetic import (
    TEMPLATES,
    gsm8k_solution,
    make_gsm8k_dataset,
    make_metamath_dataset,
    question_split,
    sample_problems,
)
from dude_trl.gsm8k import extract_answer

CALC = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def _exact(expression: str) -> Fraction:
    """Evaluate a calculator annotation such as ``12*30/100`` exactly."""
    assert re.fullmatch(r"[\d.+\-*/]+", expression), expression
    tokens = re.findall(r"\d+(?:\.\d+)?|[+\-*/]", expression)
    # Only + - * / appear: evaluate with precedence via Python on Fractions.
    return eval("".join(f"Fraction('{t}')" if t[0].isdigit() else t for t in tokens))  # noqa: S307


@pytest.fixture(scope="module")
def train_gsm8k() -> datasets.Dataset:
    return make_gsm8k_dataset(300, seed=0, split="train")


def test_gsm8k_schema_and_final_answer(train_gsm8k):
    assert train_gsm8k.column_names == ["question", "answer"]
    assert len(train_gsm8k) == 300
    for row in train_gsm8k:
        last = row["answer"].splitlines()[-1]
        assert re.fullmatch(r"#### -?\d+(\.\d+)?", last), last
        assert row["question"].endswith("?")


def test_calculator_annotations_are_correct_and_lead_to_the_answer(train_gsm8k):
    for row in train_gsm8k:
        steps = row["answer"].splitlines()[:-1]
        assert 2 <= len(steps) <= 4
        results = []
        for line in steps:
            (expression, result), = CALC.findall(line)
            assert _exact(expression) == Fraction(result), line
            results.append(result)
        assert extract_answer(row["answer"]) == extract_answer(results[-1])


def test_every_template_used_and_some_decimal_answers(train_gsm8k):
    markers = [" buys ", "per hour. It runs", " drives at ", " bags with ", "% off", "times as old", " an hour "]
    assert len(markers) == len(TEMPLATES)
    for marker in markers:
        assert sum(marker in q for q in train_gsm8k["question"]) >= 30, marker
    answers = [extract_answer(row["answer"]) for row in train_gsm8k]
    assert any("." in a for a in answers), "some answers should be decimals"


def test_deterministic_per_seed():
    assert make_gsm8k_dataset(20, seed=5).to_list() == make_gsm8k_dataset(20, seed=5).to_list()
    assert make_gsm8k_dataset(20, seed=5)["question"] != make_gsm8k_dataset(20, seed=6)["question"]


def test_train_and_test_splits_are_disjoint():
    train = set(make_gsm8k_dataset(600, seed=0, split="train")["question"])
    train |= set(make_metamath_dataset(300, seed=1, split="train")["query"])
    test = set(make_gsm8k_dataset(300, seed=0, split="test")["question"])
    test |= set(make_gsm8k_dataset(100, seed=7, split="test")["question"])
    assert len(test) > 300 and train.isdisjoint(test)
    assert all(question_split(q) == "test" for q in test)


def test_no_duplicate_questions_within_a_split():
    questions = make_gsm8k_dataset(400, seed=2, split="test")["question"]
    assert len(set(questions)) == len(questions)


def test_metamath_schema_matches_gsm8k_answers():
    gsm8k = make_gsm8k_dataset(50, seed=3)
    metamath = make_metamath_dataset(50, seed=3)
    assert metamath.column_names == ["query", "response"]
    assert metamath["query"] == gsm8k["question"]
    for response, answer in zip(metamath["response"], gsm8k["answer"]):
        assert re.search(r"\nThe answer is: -?[\d.]+$", response)
        assert "<<" not in response
        assert extract_answer(response) == extract_answer(answer)


def test_bad_split_and_size_raise():
    with pytest.raises(ValueError, match="split"):
        make_gsm8k_dataset(3, split="validation")
    with pytest.raises(ValueError, match="num_samples"):
        make_metamath_dataset(-1)
    assert len(make_gsm8k_dataset(0)) == 0


@pytest.mark.parametrize("maker", [make_gsm8k_dataset, make_metamath_dataset])
def test_to_sft_prompt_completion(maker):
    raw = maker(4, seed=0)
    question_col, answer_col = raw.column_names
    sft = to_sft_format(raw)
    assert sft.column_names == ["prompt", "completion"]
    assert is_conversational(sft[0])
    assert sft[0]["prompt"] == [{"role": "user", "content": raw[0][question_col]}]
    assert sft[0]["completion"] == [{"role": "assistant", "content": raw[0][answer_col]}]


def test_to_sft_messages_and_plain():
    raw = make_metamath_dataset(3)
    messages = to_sft_format(raw, style="messages")
    assert messages.column_names == ["messages"]
    assert [m["role"] for m in messages[0]["messages"]] == ["user", "assistant"]
    assert is_conversational(messages[0])
    plain = to_sft_format(raw, conversational=False)
    assert plain[0]["prompt"] == f"Question: {raw[0]['query']}\nAnswer:"
    assert plain[0]["completion"] == " " + raw[0]["response"]
    assert not is_conversational(plain[0])


def test_to_sft_missing_fields_names_them():
    bad = datasets.Dataset.from_dict({"problem": ["1+1?"], "solution": ["2"]})
    with pytest.raises(ValueError) as info:
        to_sft_format(bad)
    message = str(info.value)
    for name in ("problem", "solution", "question", "answer", "query", "response"):
        assert name in message
    with pytest.raises(ValueError, match="style"):
        to_sft_format(make_gsm8k_dataset(1), style="chat")


def test_load_sft_dataset_synthetic():
    for name in (None, "synthetic"):
        sft = load_sft_dataset(name, num_samples=6, seed=1)
        assert len(sft) == 6 and sft.column_names == ["prompt", "completion"]
        assert sft[0]["completion"][0]["content"].splitlines()[-1].startswith("The answer is: ")
    assert load_sft_dataset(None, num_samples=4, style="messages").column_names == ["messages"]


def test_load_sft_dataset_local_json(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    rows = make_metamath_dataset(10, seed=4).to_list()
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sft = load_sft_dataset(str(jsonl), num_samples=5, seed=0)
    assert len(sft) == 5
    assert {row["prompt"][0]["content"] for row in sft} <= {row["query"] for row in rows}

    gsm = tmp_path / "gsm.json"
    gsm.write_text(json.dumps(make_gsm8k_dataset(3).to_list()))
    assert len(load_sft_dataset(str(gsm))) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="question"):
        load_sft_dataset(str(bad))


# --- the graded curriculum ------------------------------------------------------------------------


def test_curriculum_has_one_two_and_three_step_problems_with_exact_answers():
    problems = sample_problems(90, seed=0, split="train", problem_set="curriculum")
    steps = Counter(len(p.steps) for p in problems)
    assert steps == {1: 30, 2: 30, 3: 30}  # the levels in equal parts
    for problem in problems:
        for step in problem.steps:  # every step's arithmetic is exact
            assert Fraction(eval(step.left)) == step.result, step  # noqa: S307 -- our own "a+b" strings
        assert problem.steps[-1].result == problem.answer
        assert problem.answer == int(problem.answer) and 0 <= problem.answer < 1000
    answer = gsm8k_solution(problems[0], calculator=False)
    assert "<<" not in answer and answer.endswith(f"#### {problems[0].answer}")


def test_curriculum_splits_are_disjoint_and_the_synthetic_set_is_unchanged():
    train = set(make_gsm8k_dataset(600, seed=0, problem_set="curriculum")["question"])
    test = set(make_gsm8k_dataset(200, seed=0, split="test", problem_set="curriculum")["question"])
    assert len(train) == 600 and len(test) == 200 and not train & test
    # Adding a problem set left the default one as it was: same seed string, same first problem.
    assert make_gsm8k_dataset(1, seed=0)["question"][0] == sample_problems(1, seed=0)[0].question
    with pytest.raises(ValueError, match="unknown synthetic problem set 'nope'.*curriculum"):
        make_gsm8k_dataset(1, problem_set="nope")


def test_load_sft_dataset_curriculum_is_gsm8k_format():
    sft = load_sft_dataset("curriculum", num_samples=5, seed=3)
    assert len(sft) == 5
    assert all(row["completion"][0]["content"].splitlines()[-1].startswith("#### ") for row in sft)


# --- real GSM8K: the offline dev slice ---------------------------------------------------------------

REAL_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def _gsm8k_like_file(tmp_path: Path, n: int = 30) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}: what is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


def test_dev_slice_and_train_slice_split_a_local_file(tmp_path):
    path = _gsm8k_like_file(tmp_path, 600)
    train = load_qa_dataset(str(path), GSM8K_TRAIN_SPLIT)
    dev = load_qa_dataset(str(path), GSM8K_DEV_SPLIT)
    assert len(train) == 100 and len(dev) == 500
    assert not set(train["question"]) & set(dev["question"])
    assert dev["question"][0] == "Q100: what is 100+1?"
    with pytest.raises(ValueError, match="local file: its one split is 'train', not 'test'.*train\\[-500:\\]"):
        load_qa_dataset(str(path), "test")


@pytest.mark.skipif(not REAL_GSM8K.exists(), reason=f"{REAL_GSM8K} missing")
def test_real_gsm8k_dev_slice_is_never_trained_on():
    """The documented split of the real train file: its last 500 problems are the dev set, the
    other 6,973 train; no question is in both, and together they are the whole file."""
    train = load_sft_dataset(str(REAL_GSM8K), split=GSM8K_TRAIN_SPLIT)
    dev = load_gsm8k_eval_dataset(str(REAL_GSM8K), split=GSM8K_DEV_SPLIT)
    assert len(train) == 6973 and len(dev) == 500
    trained = training_questions(train)
    assert len(trained) >= 6900  # GSM8K has a few repeated questions
    assert not trained & {" ".join(q.split()) for q in dev["question"]}
    check_disjoint(train, dev["question"], "the dev slice")  # does not raise
    with pytest.raises(ValueError, match="500 of the 500 evaluation questions of the whole file are also in"):
        check_disjoint(load_sft_dataset(str(REAL_GSM8K)), dev["question"], "the whole file")


@pytest.mark.parametrize("style, conversational", [("prompt_completion", True), ("prompt_completion", False),
                                                    ("messages", True)])  # fmt: skip
def test_check_disjoint_reads_every_sft_format(tmp_path, style, conversational):
    path = _gsm8k_like_file(tmp_path)
    sft = load_sft_dataset(str(path), split="train[:20]", style=style, conversational=conversational)
    assert training_questions(sft) == {f"Q{i}: what is {i}+1?" for i in range(20)}
    check_disjoint(sft, [f"Q{i}: what is {i}+1?" for i in range(20, 30)], "dev")
    with pytest.raises(ValueError, match="1 of the 2 evaluation questions of dev are also in the training data"):
        check_disjoint(sft, ["Q3: what is 3+1?", "new"], "dev")


def test_hub_gsm8k_loads_its_main_config(monkeypatch):
    """Online, `openai/gsm8k` needs its config name; the same loader then reads any split."""
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"question": ["q"], "answer": ["#### 1"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_qa_dataset("openai/gsm8k", "test[:10]")) == 1
    load_sft_dataset("openai/gsm8k", split="train")
    load_gsm8k_eval_dataset("openai/gsm8k")
    load_qa_dataset("meta-math/MetaMathQA", "train", config_name=None)
    assert calls == [("openai/gsm8k", "main", "test[:10]"), ("openai/gsm8k", "main", "train"),
                     ("openai/gsm8k", "main", "test"), ("meta-math/MetaMathQA", None, "train")]  # fmt: skip
