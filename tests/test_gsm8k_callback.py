"""GSM8KEvalCallback inside a short trl.SFTTrainer run on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from _tiny_lm_gsm8k import ScriptedLM, answer_table, make_llama, make_tokenizer
from dude_trl.callbacks.gsm8k_eval import GSM8KEvalCallback
from dude_trl.data import to_sft_format
from dude_trl.synthetic import make_gsm8k_dataset, make_metamath_dataset

KEYS = ("gsm8k/accuracy", "gsm8k/accuracy_flexible", "gsm8k/num_samples")


class RecordingCallback(TrainerCallback):
    """Stands in for a reporting integration: records every ``logs`` dict ``on_log`` sees."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append({**logs, "_step": state.global_step})


def _args(tmp_path, **overrides) -> SFTConfig:
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        max_length=512, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def _train_data():
    return to_sft_format(make_metamath_dataset(8, seed=0), conversational=False)


@pytest.fixture(scope="module")
def eval_data():
    return make_gsm8k_dataset(3, seed=0, split="test")


def _gsm8k_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if "gsm8k/accuracy" in row]


def test_callback_evaluates_at_steps_and_logs_through_trainer(tmp_path, eval_data):
    recorder = RecordingCallback()
    callback = GSM8KEvalCallback(eval_data, eval_steps=2, max_new_tokens=4, batch_size=3, eval_on_start=True)
    trainer = SFTTrainer(
        model=make_llama(), args=_args(tmp_path), train_dataset=_train_data(),
        processing_class=make_tokenizer(), callbacks=[recorder, callback],
    )
    assert callback.trainer is trainer
    trainer.train()

    # Step 0 (eval_on_start), every 2 steps; step 4 is the last step and is not repeated at train end.
    assert [h["step"] for h in callback.history] == [0, 2, 4]
    history_rows = _gsm8k_rows(trainer.state.log_history)
    assert [row["step"] for row in history_rows] == [0, 2, 4]
    for row in history_rows:
        assert 0.0 <= row["gsm8k/accuracy"] <= 1.0
        assert row["gsm8k/num_samples"] == 3
        assert "loss" not in row and "mean_token_accuracy" not in row
    # SFTTrainer's own training metrics stay on its loss rows.
    loss_rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(loss_rows) == 4 and all("mean_token_accuracy" in row for row in loss_rows)
    # A callback registered before this one (as reporting integrations are) saw the metrics.
    seen = _gsm8k_rows(recorder.seen)
    assert [row["_step"] for row in seen] == [0, 2, 4]
    assert all(set(KEYS) <= set(row) for row in seen)
    # Training mode came back after each evaluation.
    assert trainer.model.training
    samples = tmp_path / "gsm8k_samples_step2.jsonl"
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == 3 and {"question", "completion", "reference", "correct"} <= set(records[0])


def test_callback_final_eval_when_last_step_is_not_a_multiple(tmp_path, eval_data):
    tokenizer = make_tokenizer()
    callback = GSM8KEvalCallback(eval_data, eval_steps=2, max_new_tokens=4, num_logged_samples=1)
    trainer = SFTTrainer(
        model=make_llama(), args=_args(tmp_path, max_steps=3), train_dataset=_train_data(),
        processing_class=tokenizer,
    )
    trainer.add_callback(callback)  # added after init: bound at train begin instead
    trainer.train()
    assert [row["step"] for row in _gsm8k_rows(trainer.state.log_history)] == [2, 3]
    assert not (tmp_path / "gsm8k_samples_step0.jsonl").exists()
    assert len((tmp_path / "gsm8k_samples_step3.jsonl").read_text().splitlines()) == 1


def test_callback_accuracy_reflects_the_model(tmp_path, eval_data):
    """Driven with a scripted model that always answers right, the logged accuracy is exactly 1."""
    tokenizer = make_tokenizer()
    callback = GSM8KEvalCallback(eval_data, eval_steps=1, tokenizer=tokenizer)
    trainer = SFTTrainer(
        model=make_llama(), args=_args(tmp_path), train_dataset=_train_data(),
        processing_class=make_tokenizer(), callbacks=[callback],
    )
    scripted = ScriptedLM(tokenizer, answer_table(eval_data))
    trainer.state.global_step = 1
    callback.on_step_end(trainer.args, trainer.state, trainer.control, model=scripted)
    (row,) = _gsm8k_rows(trainer.state.log_history)
    assert (row["gsm8k/accuracy"], row["gsm8k/num_samples"], row["step"]) == (1.0, 3, 1)
    assert scripted.calls and all(call["left_padded"] for call in scripted.calls)


def test_callback_rejects_bad_eval_steps(eval_data):
    with pytest.raises(ValueError, match="eval_steps"):
        GSM8KEvalCallback(eval_data, eval_steps=0)


def test_callback_defaults_to_synthetic_test_split():
    callback = GSM8KEvalCallback(num_samples=5)
    assert len(callback.dataset) == 5
    assert set(callback.dataset.column_names) == {"question", "answer"}


@pytest.mark.multiproc
@pytest.mark.slow
def test_callback_under_deepspeed_zero3_two_processes(tmp_path):
    """2 ranks, ZeRO-3 on CPU (gloo): ranks with unequal prompt shares generate in lockstep."""
    pytest.importorskip("deepspeed")
    tests_dir = Path(__file__).parent
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(tests_dir / "_tiny_lm_gsm8k.py"), "--zero3", str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"zero3_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert [(row["step"], row["gsm8k/num_samples"]) for row in ranks[0]] == [(0, 5), (1, 5), (2, 5)]
    # Generation read the real (gathered) weights: at step 0 the completions equal a
    # single-process evaluation of the same freshly built model.
    from dude_trl.gsm8k import evaluate

    reference = evaluate(make_llama(), make_tokenizer(), make_gsm8k_dataset(5, seed=0, split="test"),
                         batch_size=2, max_new_tokens=6, num_returned_samples=5)  # fmt: skip
    expected = {s["question"]: s["completion"] for s in reference["samples"]}
    rows = [json.loads(line) for line in (tmp_path / "gsm8k_samples_step0.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and len(expected) == 5
    assert {row["question"]: row["completion"] for row in rows} == expected
    assert len({row["completion"] for row in rows}) > 1  # not a constant output
