"""Pluggable evaluation: a toy task (not GSM8K) through the generic generation, evaluate and EvalCallback."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import StoppingCriteria
from trl import SFTConfig, SFTTrainer

from _tiny_lm_gsm8k import make_llama, make_tokenizer
from dude_trl.callbacks import EvalCallback
from dude_trl.data import to_sft_format
from dude_trl.synthetic import make_metamath_dataset
from dude_trl.eval import EvalTask, evaluate, generate

WORDS = ["apple", "kiwi", "banana split", "fig", "cherry pie"]


class StopAfter(StoppingCriteria):
    """Marks every sequence done once it holds ``count`` new tokens."""

    def __init__(self, prompt_length: int, count: int):
        self.prompt_length, self.count = prompt_length, count

    def __call__(self, input_ids, scores, **kwargs):
        done = input_ids.shape[1] - self.prompt_length >= self.count
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class EchoTask(EvalTask):
    """Toy task: prompt ``Say: <word>``; scores whether the completion is non-empty and its length."""

    name = "echo"
    metrics = ("nonempty", "length")
    max_new_tokens = 8

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after

    def prompt(self, row, tokenizer, use_chat_template):
        return f"Say: {row['word']}\n"

    def stopping_criteria(self, tokenizer, prompt_length):
        return [] if self.stop_after is None else [StopAfter(prompt_length, self.stop_after)]

    def score(self, completion, row):
        return {"nonempty": len(completion) > 0, "length": float(len(completion))}

    def sample(self, row, completion, scores):
        return {"word": row["word"], "completion": completion, **scores}


def _rows() -> list[dict]:
    return [{"word": word} for word in WORDS]


def _prompts() -> list[str]:
    return [f"Say: {word}\n" for word in WORDS]


def test_generate_keeps_input_order_and_batching_does_not_change_greedy_completions():
    tokenizer, model = make_tokenizer(), make_llama()
    model.train()
    one_by_one = [generate(model, tokenizer, [p], max_new_tokens=6, progress=False)[0] for p in _prompts()]
    for batch_size in (1, 2, 5):
        batched = generate(model, tokenizer, _prompts(), max_new_tokens=6, batch_size=batch_size, progress=False)
        assert batched == one_by_one, batch_size
    reversed_ = generate(model, tokenizer, _prompts()[::-1], max_new_tokens=6, batch_size=2, progress=False)
    assert reversed_ == one_by_one[::-1]
    assert len(set(one_by_one)) > 1  # not a constant output, so the order check means something
    assert model.training and tokenizer.padding_side == "right"
    assert generate(model, tokenizer, [], max_new_tokens=6, progress=False) == []


def test_generate_applies_the_stopping_criteria_it_is_given():
    tokenizer, model = make_tokenizer(), make_llama()
    lengths = []

    def stopping(prompt_length: int):
        lengths.append(prompt_length)
        return [StopAfter(prompt_length, 2)]

    completions = generate(model, tokenizer, _prompts(), max_new_tokens=8, batch_size=5, stopping=stopping,
                           progress=False)
    full = generate(model, tokenizer, _prompts(), max_new_tokens=8, batch_size=5, progress=False)
    assert lengths == [len(tokenizer(max(_prompts(), key=len))["input_ids"])]
    # One character per token: at most 2 new characters (fewer when EOS or a special token came first).
    assert all(len(c) <= 2 for c in completions) and any(len(c) > 2 for c in full)
    assert [f[:len(c)] for f, c in zip(full, completions)] == completions


def test_evaluate_averages_the_task_scores():
    tokenizer, model = make_tokenizer(), make_llama()
    result = evaluate(model, tokenizer, EchoTask(stop_after=3), _rows(), batch_size=2, num_samples=4,
                      progress=False, num_returned_samples=2)
    scores = result["scores"]
    assert len(scores) == 4
    assert result["metrics"] == {
        "nonempty": sum(s["nonempty"] for s in scores) / 4,
        "length": sum(s["length"] for s in scores) / 4,
        "num_samples": 4,
    }
    assert all(s["length"] <= 3 for s in scores)
    assert [s["word"] for s in result["samples"]] == WORDS[:2]
    empty = evaluate(model, tokenizer, EchoTask(), [], progress=False)
    assert empty["metrics"] == {"nonempty": 0.0, "length": 0.0, "num_samples": 0}


def test_eval_callback_logs_a_toy_task_under_its_name(tmp_path):
    callback = EvalCallback(EchoTask(), _rows(), eval_steps=1, batch_size=2, num_logged_samples=3)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        max_length=512, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=make_llama(), args=args, processing_class=make_tokenizer(), callbacks=[callback],
        train_dataset=to_sft_format(make_metamath_dataset(4, seed=0), conversational=False),
    )
    assert callback.trainer is trainer
    trainer.train()

    rows = [row for row in trainer.state.log_history if "echo/num_samples" in row]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["echo/num_samples"] == len(WORDS)
        assert 0.0 <= row["echo/nonempty"] <= 1.0 and 0.0 <= row["echo/length"] <= EchoTask.max_new_tokens
        assert not any(key.startswith("gsm8k/") for key in row)
    records = [json.loads(line) for line in (tmp_path / "echo_samples_step2.jsonl").read_text().splitlines()]
    assert [r["word"] for r in records] == WORDS[:3] and {"completion", "nonempty", "length"} <= set(records[0])
    assert not list(tmp_path.glob("gsm8k_samples_step*.jsonl"))


def test_eval_callback_without_data_needs_a_task_that_loads_some():
    with pytest.raises(NotImplementedError, match="echo"):
        EvalCallback(EchoTask())
