"""GradNormCallback: pre-clip values, accumulation, group decomposition, logging path, ZeRO."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm_gradnorm import make_trainer, write_deepspeed_config  # noqa: E402

from dude_trl.callbacks.grad_norm import GradNormCallback, ParamGroups, classify_parameter  # noqa: E402

GROUPS = ("grad_norm/magnitude", "grad_norm/lora_A", "grad_norm/lora_B")
MAX_GRAD_NORM = 0.01  # far below the tiny model's gradient norms (~0.1-0.2): clipping is always active
REL = 1e-4


class RecordingCallback(TrainerCallback):
    """Stands in for a reporting integration: stores a copy of every `logs` it receives."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train_logs(trainer) -> list[dict]:
    """Training log rows (one per logging step) of a finished run."""
    return [row for row in trainer.state.log_history if "loss" in row]


def assert_close(a: float, b: float, rel: float = REL) -> None:
    assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-9), (a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """4 steps, batch 4, no accumulation, clipping at 0.01, per-module norms, a recorder first."""
    callback = GradNormCallback(per_module=True)
    trainer = make_trainer(
        str(tmp_path_factory.mktemp("ref")), callbacks=[callback], max_steps=4, max_grad_norm=MAX_GRAD_NORM
    )
    recorder = RecordingCallback()
    trainer.callback_handler.callbacks.insert(0, recorder)
    trainer.train()
    return trainer, callback, recorder


def test_total_equals_trainer_pre_clip_grad_norm(reference):
    trainer, _, _ = reference
    rows = train_logs(trainer)
    assert len(rows) == 4
    for row in rows:
        assert row["grad_norm"] > 5 * MAX_GRAD_NORM  # the Trainer clipped every step
        assert_close(row["grad_norm/total"], row["grad_norm"])


def test_group_norms_decompose_total(reference):
    trainer, callback, _ = reference
    for row in train_logs(trainer):
        groups = [row[name] for name in GROUPS]
        assert all(v > 0 for v in groups)
        assert "grad_norm/other" not in row  # only adapter parameters are trainable here
        assert_close(row["grad_norm/total"] ** 2, sum(v * v for v in groups))
        for group in ("magnitude", "lora_A", "lora_B"):
            per_module = [row[f"grad_norm/{m}/{group}"] for m in ("q_proj", "v_proj")]
            assert all(v > 0 for v in per_module)
            assert_close(row[f"grad_norm/{group}"] ** 2, sum(v * v for v in per_module))
    assert callback.last == {k: v for k, v in train_logs(trainer)[-1].items() if k.startswith("grad_norm/")}


def test_values_reach_log_history_and_earlier_callbacks(reference):
    trainer, callback, recorder = reference
    assert trainer.callback_handler.callbacks[0] is recorder
    assert callback.trainer is trainer  # found through the call stack, no explicit attach
    assert GradNormCallback.ensure_attached(trainer) is callback
    assert trainer.callback_handler.callbacks.index(callback) > 0
    recorded = [logs for logs in recorder.logs if "loss" in logs]
    assert len(recorded) == 4
    for logs, row in zip(recorded, train_logs(trainer)):
        for name in ("grad_norm/total",) + GROUPS:
            assert logs[name] == row[name]
    # the hooks are gone once training ended
    assert "clip_grad_norm_" not in vars(trainer.accelerator)


def test_gradient_accumulation_matches_full_batch(reference, tmp_path):
    ref_trainer, _, _ = reference
    trainer = make_trainer(
        str(tmp_path),
        callbacks=[GradNormCallback()],
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=MAX_GRAD_NORM,
    )
    trainer.train()
    rows = train_logs(trainer)
    assert len(rows) == 2
    # Step k's gradients depend only on updates 1..k-1, which both runs made with the same lr.
    for row, ref in zip(rows, train_logs(ref_trainer)[:2]):
        assert not any(k.startswith("grad_norm/q_proj") for k in row)  # per_module defaults to off
        for name in ("grad_norm/total",) + GROUPS:
            assert_close(row[name], ref[name])


def test_logged_value_is_mean_over_logging_interval_and_attach(reference, tmp_path):
    ref_trainer, _, _ = reference
    trainer = make_trainer(str(tmp_path), max_steps=4, logging_steps=2, max_grad_norm=MAX_GRAD_NORM)
    callback = GradNormCallback.ensure_attached(trainer)
    assert callback.trainer is trainer
    assert GradNormCallback.ensure_attached(trainer) is callback  # reused, never a second one
    assert callback.attach(trainer) is callback  # idempotent: one callback, one log wrapper
    assert sum(isinstance(cb, GradNormCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    rows = train_logs(trainer)
    ref = train_logs(ref_trainer)
    assert len(rows) == 2
    for i, row in enumerate(rows):
        for name in ("grad_norm/total",) + GROUPS:
            assert_close(row[name], (ref[2 * i][name] + ref[2 * i + 1][name]) / 2)
    assert_close(callback.last["grad_norm/total"], ref[3]["grad_norm/total"])


def test_classify_parameter():
    assert classify_parameter("base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == ("lora_A", "q_proj")
    assert classify_parameter("x.mlp.down_proj.lora_B.default.weight") == ("lora_B", "down_proj")
    assert classify_parameter("x.v_proj.lora_magnitude_vector.default.weight") == ("magnitude", "v_proj")
    assert classify_parameter("x.embed_tokens.lora_embedding_A.default") == ("lora_A", "embed_tokens")
    assert classify_parameter("x.lm_head.modules_to_save.default.weight") == ("other", None)


def _tiny_peft(use_dora: bool, modules_to_save=None):
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    lora = LoraConfig(r=2, use_dora=use_dora, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save)
    return get_peft_model(LlamaForCausalLM(config), lora)


def test_param_groups_norms_match_manual_computation():
    torch.manual_seed(0)
    model = _tiny_peft(use_dora=True, modules_to_save=["lm_head"])
    groups = ParamGroups.from_model(model, per_module=True)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = [torch.randn_like(p) for p in groups.params]
    grads[1] = None  # a parameter without gradient this step counts as zero
    values = dict(zip(groups.metric_names, groups.norms(grads).tolist()))

    expected: dict[str, float] = {}
    for (name, _), grad in zip(named.items(), grads):
        if grad is None:
            continue
        group, module = classify_parameter(name)
        sq = grad.double().pow(2).sum().item()
        for key in ("grad_norm/total", f"grad_norm/{group}") + ((f"grad_norm/{module}/{group}",) if module else ()):
            expected[key] = expected.get(key, 0.0) + sq
    expected = {k: math.sqrt(v) for k, v in expected.items()}
    assert set(values) >= set(expected)
    assert "grad_norm/other" in values
    for key, value in expected.items():
        assert_close(values[key], value, rel=1e-5)


def test_plain_lora_has_no_magnitude_group():
    groups = ParamGroups.from_model(_tiny_peft(use_dora=False), per_module=False)
    assert groups.metric_names == ["grad_norm/total", "grad_norm/lora_A", "grad_norm/lora_B"]


def _run_zero(tmp_path: Path, stage: int, batch_size: int, grad_accum: int) -> list[list[dict]]:
    """Train with 2 processes under ZeRO-`stage` on global batch 4; return each rank's rows."""
    config = write_deepspeed_config(str(tmp_path / f"zero{stage}.json"), stage)
    out = tmp_path / f"zero{stage}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(Path(__file__).parent / "_tiny_lm_gradnorm.py"),
        "--output-dir", str(out), "--deepspeed", config,
        "--batch-size", str(batch_size), "--grad-accum", str(grad_accum),
        "--max-steps", "2", "--max-grad-norm", str(MAX_GRAD_NORM),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("stage,batch_size,grad_accum", [(2, 1, 2), (3, 2, 1)])
def test_zero_two_processes_match_single_process(reference, tmp_path, stage, batch_size, grad_accum):
    ref = train_logs(reference[0])[:2]
    ranks = _run_zero(tmp_path, stage, batch_size, grad_accum)
    for rows in ranks:
        assert len(rows) == 2
        for row, expected in zip(rows, ref):
            assert_close(row["grad_norm/total"], row["grad_norm"])  # DeepSpeed's own pre-clip norm
            for name in ("grad_norm/total",) + GROUPS:
                assert_close(row[name], expected[name])
