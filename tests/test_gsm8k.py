"""GSM8K answer extraction, correctness, batched evaluation (single and multi-process)."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model

from _tiny_lm_gsm8k import (
    ScriptedLM,
    answer_table,
    even_answer_policy,
    make_llama,
    make_tokenizer,
)
from dude_trl import gsm8k
from dude_trl.synthetic import make_gsm8k_dataset, make_metamath_dataset
from dude_trl.eval import generation
from dude_trl.gsm8k import (
    AnswerCompleteCriteria,
    build_prompt,
    evaluate,
    extract_answer,
    is_correct,
    is_correct_flexible,
    last_number,
    load_gsm8k_eval_dataset,
    normalize_number,
    strict_answer,
)

TESTS_DIR = Path(__file__).parent

# --- extraction --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("The answer is: 18", "18"),
    ("The answer is 18.", "18"),
    ("so the result is \\boxed{42}", "42"),
    ("It costs $1,200.00", "1200"),
    ("#### $1,200.00", "1200"),
    ("The temperature fell to -7", "-7"),
    ("#### -3", "-3"),
    ("#### 0.5", "0.5"),
    ("#### .5", "0.5"),
    ("#### 5.0", "5"),
    ("#### 5.", "5"),
    ("#### 007", "7"),
    ("#### 1,234,567", "1234567"),
    ("#### 18 dollars. Next question: 5 apples", "18"),
    ("The answer is: 5\n\nQuestion: what is 7?", "5"),
    ("The final answer is 12", "12"),
    ("the answer is $ 3,000 in total", "3000"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac{3}{4}}", "0.75"),
    ("she had 3 apples and ate 2, leaving 1", "1"),
    ("10-4 = 6", "6"),
    ("x = 10 - 4", "4"),  # a subtraction, not a negative number
    ("she owes -$5", "-5"),
    ("#### $-5", "-5"),
    ("She bought 1,234, then 5", "5"),
    ("#### \u22129", "-9"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    # Precedence: #### > \boxed{} > "The answer is" > last number.
    ("The answer is 3. \\boxed{4} #### 5\nthen 6", "5"),
    ("The answer is 3. \\boxed{4} then 6", "4"),
    ("The answer is 3, then 6 more", "3"),
    ("#### 1\n#### 2", "2"),  # the last marker of a kind wins
    ("The answer is 1. The answer is: 2. 9", "2"),
    ("\\boxed{1} and \\boxed{2}", "2"),
    ("#### none\nThe answer is 8", "8"),  # a marker without a number does not count
    ("\\boxed{x} then 3", "3"),
    ("#### oops", None),
])
def test_marker_precedence(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "no numbers here", "####", "\\boxed{", "The answer is:", "$", "-", ".", ","])
def test_no_number_gives_none_and_incorrect(text):
    assert extract_answer(text) is None
    assert not is_correct(text, "5")
    assert not is_correct("#### 5", text)


def test_never_raises_on_random_strings():
    rng = random.Random(0)
    alphabet = string.printable + "\u2212$#{}\\,.-" * 3
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        answer = extract_answer(text)
        assert answer is None or normalize_number(answer) == answer
        is_correct(text, text)
    huge = "9" * 6000
    assert extract_answer(f"#### {huge}") == huge
    assert is_correct(f"#### {huge}", huge) and not is_correct(f"#### {huge}", huge[:-1] + "8")
    assert is_correct_flexible(huge, huge) and not is_correct_flexible(huge, huge[:-1] + "8")
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer("\\boxed{" * 2000) is None


@pytest.mark.parametrize("completion, reference, expected", [
    ("The answer is: 72", "72", True),
    ("The answer is: 72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", True),
    ("#### 5.0", "5", True),
    ("\\boxed{.5}", "0.5", True),
    ("The answer is $1,200.00", "#### 1200", True),
    ("#### 0.3333333", "0.3333334", True),  # within 1e-6
    ("#### 0.333", "0.334", False),
    ("#### 71", "72", False),
    ("#### -3", "3", False),
    ("I don't know", "#### 4", False),
    ("#### 4", "no reference number", False),
])
def test_is_correct(completion, reference, expected):
    assert is_correct(completion, reference) is expected


@pytest.mark.parametrize("completion, reference, strict, flexible", [
    ("#### 72", "72", True, True),
    ("#### 72\nNext, 3 more", "72", True, False),  # the marker wins strictly; the last number is 3
    ("The answer is 5 (from 2 and 3)", "#### 5", True, False),
    ("\\boxed{5} since 2 + 3", "5", True, False),
    # No final-answer marker: strictly wrong, as lm-eval's strict-match; flexibly the last number.
    ("2 + 3 = 5", "5", False, True),
    ("it is \u22124", "-4", False, True),
    ("Kira has 26+8 = 34.\n#### 35", "#### 34", False, False),
    ("Kira has 26+8 = 34.\n#### 34", "#### 34", True, True),
    ("Kira has 26+8 = 34.", "#### 34", False, True),  # right number, final answer never stated
    ("#### 34", 34, True, True),  # numeric references (int / float columns)
    ("The answer is 3/4 = 0.75", 0.75, True, True),  # a stated fraction is its value
    ("The answer is: 3/4", "0.75", True, False),
    ("#### 1/3", "0.3333333", True, False),
    ("#### 3/0", "3", False, False),  # no value, not an error
    ("#### 12/4/2020", "3", False, False),  # a date, not a fraction
    ("no number", "5", False, False),
    ("", "5", False, False),
])
def test_strict_and_flexible_readings(completion, reference, strict, flexible):
    assert is_correct(completion, reference) is strict
    assert is_correct_flexible(completion, reference) is flexible


@pytest.mark.parametrize("completion, strict, flexible", [
    ("#### 5", "5", "5"), ("2 + 3 = 5", None, "5"), ("The answer is 4, not 5", "4", "5"), ("none", None, None),
])
def test_strict_answer_needs_a_marker(completion, strict, flexible):
    assert strict_answer(completion) == strict
    assert last_number(completion) == flexible


# --- prompts and stopping -----------------------------------------------------------------------------


def test_plain_and_chat_prompts_with_few_shot():
    shots = [("What is 1+1?", "1+1 = 2.\n#### 2")]
    plain = build_prompt(make_tokenizer(), "What is 2+2?", shots)
    assert plain == "Question: What is 1+1?\nAnswer: 1+1 = 2.\n#### 2\n\nQuestion: What is 2+2?\nAnswer:"
    chat = build_prompt(make_tokenizer(chat_template=True), "What is 2+2?", shots, use_chat_template=True)
    assert chat.index("What is 1+1?") < chat.index("#### 2") < chat.index("What is 2+2?")
    assert chat.endswith("<assistant>\n")


def test_stopping_criterion_marks_rows_with_a_complete_answer():
    tokenizer = make_tokenizer()
    prompt = "Question: q\nAnswer:"
    texts = [" 2*3 = 6\n#### 6\n", " 2*3 = 6\n#### 6", " The answer is: 6\n", " 6\nQuestion: next"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(row) for row in new_ids)
    pad = tokenizer.pad_token_id
    batch = torch.tensor([prompt_ids + row + [pad] * (width - len(row)) for row in new_ids])
    done = AnswerCompleteCriteria(tokenizer, prompt_length=len(prompt_ids))(batch, None)
    assert done.tolist() == [True, False, True, True]


# --- evaluate with a scripted model (accuracy known exactly) ---------------------------------------


@pytest.fixture(scope="module")
def eval_set() -> datasets.Dataset:
    return make_gsm8k_dataset(10, seed=0, split="test")


@pytest.mark.parametrize("chat", [False, True])
def test_scripted_model_always_right_scores_one(eval_set, chat):
    tokenizer = make_tokenizer(chat_template=chat)
    model = ScriptedLM(tokenizer, answer_table(eval_set))
    model.train()
    result = evaluate(model, tokenizer, eval_set, batch_size=4, progress=False, few_shot=2)
    assert result["accuracy"] == 1.0 and result["num_samples"] == 10 and result["num_correct"] == 10
    assert result["accuracy_flexible"] == 1.0  # every scripted completion ends with its answer
    assert [c["batch"] for c in model.calls] == [4, 4, 2]
    assert all(c["left_padded"] and not c["grad_enabled"] for c in model.calls)
    assert model.training and model.config.use_cache is False
    assert tokenizer.padding_side == "right"
    assert all(s["correct"] for s in result["samples"])


def test_scripted_model_always_wrong_scores_zero(eval_set):
    tokenizer = make_tokenizer()
    model = ScriptedLM(tokenizer, answer_table(eval_set), policy=lambda question, answer: False)
    result = evaluate(model, tokenizer, eval_set, progress=False)
    assert result["accuracy"] == 0.0 and result["num_samples"] == 10
    assert not any(s["correct"] for s in result["samples"])


def test_partial_accuracy_and_num_samples(eval_set):
    tokenizer = make_tokenizer()
    model = ScriptedLM(tokenizer, answer_table(eval_set), policy=even_answer_policy)
    expected = [even_answer_policy(q, a) for q, a in zip(eval_set["question"], eval_set["answer"])]
    result = evaluate(model, tokenizer, eval_set, batch_size=3, num_samples=7, progress=False,
                      num_returned_samples=7)
    assert result["num_samples"] == 7
    assert result["accuracy"] == pytest.approx(sum(expected[:7]) / 7)
    assert [s["correct"] for s in result["samples"]] == expected[:7]
    assert [s["question"] for s in result["samples"]] == eval_set["question"][:7]


def test_metamath_schema_and_list_input(eval_set):
    tokenizer = make_tokenizer()
    metamath = make_metamath_dataset(5, seed=0, split="test")
    model = ScriptedLM(tokenizer, dict(zip(metamath["query"], metamath["response"])))
    assert evaluate(model, tokenizer, metamath, progress=False)["accuracy"] == 1.0
    assert evaluate(model, tokenizer, metamath.to_list(), progress=False)["num_samples"] == 5


def test_evaluate_rejects_bad_inputs(eval_set):
    tokenizer = make_tokenizer()
    model = ScriptedLM(tokenizer, answer_table(eval_set))
    with pytest.raises(ValueError, match="question"):
        evaluate(model, tokenizer, datasets.Dataset.from_dict({"text": ["x"]}), progress=False)
    with pytest.raises(ValueError, match="chat template"):
        evaluate(model, tokenizer, eval_set, use_chat_template=True, progress=False)


def test_rank_share_pads_to_equal_generate_calls():
    shares = [generation.rank_share(5, rank, 2) for rank in range(2)]
    assert shares == [[0, 2, 4], [1, 3, None]]
    assert generation.rank_share(1, 2, 4) == [None]
    covered = sorted(i for rank in range(3) for i in generation.rank_share(10, rank, 3) if i is not None)
    assert covered == list(range(10))


# --- evaluate with a real tiny model -------------------------------------------------------------------


def _enable_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _is_checkpointing(model) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    return model.is_gradient_checkpointing if flag is None else flag


def test_tiny_llama_batched_matches_unbatched_and_restores_state():
    tokenizer = make_tokenizer()
    model = make_llama()
    _enable_checkpointing(model)
    model.train()
    model.config.use_cache = False
    data = make_gsm8k_dataset(3, seed=1, split="test")
    one = evaluate(model, tokenizer, data, batch_size=1, max_new_tokens=6, progress=False)
    three = evaluate(model, tokenizer, data, batch_size=3, max_new_tokens=6, progress=False)
    assert 0.0 <= three["accuracy"] <= 1.0 and three["num_samples"] == 3
    # Left padding is right: padding a short prompt does not change its greedy completion.
    assert [s["completion"] for s in one["samples"]] == [s["completion"] for s in three["samples"]]
    assert model.training and _is_checkpointing(model) and model.config.use_cache is False
    assert tokenizer.padding_side == "right"


def test_tiny_peft_model_evaluates_and_restores_state():
    tokenizer = make_tokenizer(chat_template=True)
    peft_model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.eval()
    data = make_gsm8k_dataset(2, seed=2, split="test")
    result = evaluate(peft_model, tokenizer, data, batch_size=2, max_new_tokens=4, progress=False)
    assert result["num_samples"] == 2 and 0.0 <= result["accuracy"] <= 1.0
    assert not peft_model.training
    assert tokenizer.padding_side == "right"


# --- evaluation data --------------------------------------------------------------------------------------


def test_load_gsm8k_eval_dataset(tmp_path):
    synthetic = load_gsm8k_eval_dataset(num_samples=12)
    assert len(synthetic) == 12 and synthetic.column_names == ["question", "answer"]
    assert synthetic["question"] == make_gsm8k_dataset(12, split="test")["question"]
    assert len(load_gsm8k_eval_dataset()) == gsm8k.DEFAULT_EVAL_SIZE

    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic.to_list()))
    assert load_gsm8k_eval_dataset(str(path), num_samples=4)["question"] == synthetic["question"][:4]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "1+1", "target": "2"}]))
    with pytest.raises(ValueError, match="question"):
        load_gsm8k_eval_dataset(str(bad))


# --- two processes ----------------------------------------------------------------------------------------


@pytest.mark.multiproc
def test_two_process_evaluate_splits_and_gathers(tmp_path, eval_set):
    num_rows, batch_size = 5, 2
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(TESTS_DIR / "_tiny_lm_gsm8k.py"), str(tmp_path), str(num_rows), str(batch_size),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    data = make_gsm8k_dataset(num_rows, seed=3, split="test")
    tokenizer = make_tokenizer()
    single = evaluate(ScriptedLM(tokenizer, answer_table(data), policy=even_answer_policy), tokenizer, data,
                      progress=False, num_returned_samples=num_rows)
    for result in ranks:
        assert result["num_samples"] == num_rows
        assert result["accuracy"] == pytest.approx(single["accuracy"])
        assert result["samples"] == single["samples"]
        # 3 slots per rank (rank 1 has a dummy) -> 2 generate calls each, with and without ZeRO-3.
        assert result["generate_calls"] == 2 and result["rows_generated"] == 3
        assert result["synced_gpus_seen"] == [False, True]
    assert ranks[0] == ranks[1]
