"""Synthetic GSM8K/MetaMathQA data: schema, arithmetic, determinism, disjoint splits, SFT formats."""

from __future__ import annotations

import json
import os
import re
from fractions import Fraction

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import pytest
from trl.data_utils import is_conversational

from dude_trl.data import (
    TEMPLATES,
    load_sft_dataset,
    make_gsm8k_dataset,
    make_metamath_dataset,
    question_split,
    to_sft_format,
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
