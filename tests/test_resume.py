"""`trainer.train(resume_from_checkpoint=...)` continues a DuDe run exactly, even when the resuming
trainer drew another randomized SVD, and a run killed while saving resumes from the previous checkpoint."""

from __future__ import annotations

import os
import random
import string

import pytest
import torch
from conftest import make_tokenizer
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig

from dude_trl import DuDeConfig, DuDeSFTTrainer

ATOL = 1e-6  # fp32


def make_dataset() -> Dataset:
    rng = random.Random(0)
    alphabet = string.ascii_lowercase + " "
    return Dataset.from_dict({"text": ["".join(rng.choice(alphabet) for _ in range(24)) for _ in range(32)]})


class StopAfter(TrainerCallback):
    """Ends training after `step` (once its checkpoint is written), like a run killed right after."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_trainer(base_dir, output_dir, *, svd_seed=0, method="dude", max_steps=8, callbacks=None, **args):
    """A DuDe run with a randomized SVD; the LR schedule does not depend on `max_steps`, so a 4-step
    run resumed to 8 steps must match an 8-step run."""
    sft_args = SFTConfig(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=5e-3,
        lr_scheduler_type="constant_with_warmup", warmup_steps=2, logging_steps=1, use_cpu=True, report_to=[],
        seed=0, max_length=32, disable_tqdm=True, **{"save_strategy": "steps", "save_steps": 4, **args},
    )
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], method=method, svd_niter=2,
                        svd_seed=svd_seed)
    return DuDeSFTTrainer(model=base_dir, args=sft_args, train_dataset=make_dataset(),
                          processing_class=make_tokenizer(), peft_config=config, callbacks=callbacks)


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Residuals, A, B, magnitudes and init factors."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "base_layer.weight" in k}


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=ATOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    """Losses and final adapter state of an uninterrupted 8-step run."""
    trainer = make_trainer(tiny_model_dir, tmp_path_factory.mktemp("full"), save_strategy="no")
    trainer.train()
    return losses(trainer), adapter_state(trainer.model)


@pytest.fixture(scope="module")
def four_step_run(tiny_model_dir, tmp_path_factory):
    """Output dir of a 4-step run (its checkpoint-4 holds model, optimizer, scheduler, RNG states)."""
    output_dir = tmp_path_factory.mktemp("four")
    make_trainer(tiny_model_dir, output_dir, max_steps=4).train()
    return output_dir


def test_resumed_run_matches_uninterrupted_run(full_run, four_step_run, tiny_model_dir):
    expected_losses, expected_state = full_run
    torch.manual_seed(1234)  # another global RNG state, and another svd_seed: another randomized SVD
    resumed = make_trainer(tiny_model_dir, four_step_run, svd_seed=7)
    own_residuals = {k: v for k, v in adapter_state(resumed.model).items() if k.endswith("base_layer.weight")}
    # Without the rebuild the resumed run would train against this other residual.
    assert max((v - expected_state[k]).abs().max().item() for k, v in own_residuals.items()) > 1e-4

    resumed.train(resume_from_checkpoint=str(four_step_run / "checkpoint-4"))

    assert resumed.state.global_step == 8
    resumed_losses = losses(resumed)
    for step in range(5, 9):
        assert resumed_losses[step] == pytest.approx(expected_losses[step], abs=ATOL), step
    assert_same_state(adapter_state(resumed.model), expected_state)
    assert resumed.model.peft_config["default"].svd_seed == 0  # takes the checkpoint's init settings


def test_run_killed_while_saving_resumes_from_previous_checkpoint(full_run, tiny_model_dir, tmp_path):
    expected_losses, expected_state = full_run
    make_trainer(tiny_model_dir, tmp_path, save_steps=2, save_total_limit=2, callbacks=[StopAfter(6)]).train()
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-")) == [
        "checkpoint-4", "checkpoint-6"
    ]
    # Killed while writing checkpoint-6: a truncated adapter and no trainer_state.json (written last).
    newest = tmp_path / "checkpoint-6"
    os.remove(newest / "trainer_state.json")
    os.truncate(newest / "adapter_model.safetensors", 1000)

    resumed = make_trainer(tiny_model_dir, tmp_path, svd_seed=5)
    with pytest.raises(ValueError, match="Cannot resume from .*checkpoint-6.*trainer_state.json"):
        resumed.train(resume_from_checkpoint=str(newest))
    resumed.train(resume_from_checkpoint=True)  # takes checkpoint-4

    resumed_losses = losses(resumed)
    for step in range(5, 9):
        assert resumed_losses[step] == pytest.approx(expected_losses[step], abs=ATOL), step
    assert_same_state(adapter_state(resumed.model), expected_state)


def test_resume_with_another_method_fails(four_step_run, tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, method="dude_a")
    with pytest.raises(ValueError, match="another adapter configuration.*method='dude'"):
        trainer.train(resume_from_checkpoint=str(four_step_run / "checkpoint-4"))


# ---------------------------------------------------------------- ZeRO-3 (torchrun, 2 processes, gloo)

ZERO3_SCRIPT = r'''
import json, os, random, string, sys
import deepspeed, torch
from datasets import Dataset
from peft.utils.integrations import gather_params_ctx
from safetensors.torch import save_file
from trl import SFTConfig

sys.path.insert(0, os.environ["DUDE_TESTS_DIR"])
from conftest import make_tokenizer
from dude_trl import DuDeConfig, DuDeSFTTrainer
from dude_trl.layers import dude_layers
from dude_trl.saving import load_dude_model

base_dir, out, ds_config = sys.argv[1:4]
rank = int(os.environ["RANK"])
deepspeed.init_distributed(dist_backend="gloo")
rng = random.Random(0)
dataset = Dataset.from_dict({"text": ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(24))
                                      for _ in range(32)]})

def trainer(output_dir, svd_seed, max_steps, save):
    args = SFTConfig(output_dir=os.path.join(out, output_dir), deepspeed=ds_config, use_cpu=True, max_steps=max_steps,
                     per_device_train_batch_size=1, learning_rate=5e-3, lr_scheduler_type="constant_with_warmup",
                     warmup_steps=2, seed=0, bf16=False, fp16=False, max_length=32, logging_steps=1,
                     save_strategy="steps" if save else "no", save_steps=4, report_to=[], disable_tqdm=True,
                     gradient_checkpointing=False)
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], svd_niter=2, svd_seed=svd_seed)
    return DuDeSFTTrainer(model=base_dir, args=args, train_dataset=dataset, processing_class=make_tokenizer(),
                          peft_config=config)

def residuals(model):
    state, partitioned = {}, False
    for name, module in dude_layers(model, "default"):
        weight = module.get_base_layer().weight
        partitioned |= hasattr(weight, "ds_id")
        with gather_params_ctx([weight], modifier_rank=None):
            state[name.split("model.", 1)[-1]] = weight.detach().float().cpu().clone()
    return state, partitioned

def losses(t):
    return {e["step"]: e["loss"] for e in t.state.log_history if "loss" in e}

full = trainer("full", 0, 8, False)
full.train()
full.save_model(os.path.join(out, "full-adapter"))
result = {"full": losses(full)}
full_residuals, _ = residuals(full.model)
del full
trainer("four", 0, 4, True).train()
torch.manual_seed(1234)
resumed = trainer("four", 7, 8, False)
own_residuals, _ = residuals(resumed.model)
resumed.train(resume_from_checkpoint=os.path.join(out, "four", "checkpoint-4"))
resumed.save_model(os.path.join(out, "resumed-adapter"))
result["resumed"] = losses(resumed)
resumed_residuals, _ = residuals(resumed.model)
# The trainer's arguments keep ZeRO-3 active, so from_pretrained partitions the base while loading.
loaded_residuals, result["loaded_partitioned"] = residuals(load_dude_model(base_dir, os.path.join(out, "full-adapter"),
                                                                            progress=False))
if rank == 0:
    for label, state in [("full", full_residuals), ("own", own_residuals), ("resumed", resumed_residuals),
                         ("loaded", loaded_residuals)]:
        save_file(state, os.path.join(out, f"residuals-{label}.safetensors"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
'''


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_resume_and_load_rebuild_the_residual(tiny_model_dir, tmp_path):
    """Under ZeRO-3 (base partitioned at load, 2 processes): a resumed run with another SVD matches
    the uninterrupted run, and `load_dude_model` rebuilds the residual of a partitioned base."""
    import json
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    (tmp_path / "script.py").write_text(ZERO3_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               DUDE_TESTS_DIR=os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(tmp_path / "script.py"), tiny_model_dir, str(tmp_path), str(tmp_path / "zero3.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    result = json.loads((tmp_path / "result.json").read_text())
    for step in map(str, range(5, 9)):
        assert result["resumed"][step] == pytest.approx(result["full"][step], abs=ATOL), step
    full, own, resumed, loaded = (
        load_file(tmp_path / f"residuals-{label}.safetensors") for label in ("full", "own", "resumed", "loaded")
    )
    assert max((own[k] - full[k]).abs().max().item() for k in full) > 1e-4  # another SVD was drawn
    assert result["loaded_partitioned"]
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=ATOL)
        torch.testing.assert_close(loaded[key], full[key], rtol=0, atol=ATOL)
    full_adapter = load_file(tmp_path / "full-adapter" / "adapter_model.safetensors")
    resumed_adapter = load_file(tmp_path / "resumed-adapter" / "adapter_model.safetensors")
    assert full_adapter.keys() == resumed_adapter.keys()
    for key in full_adapter:
        torch.testing.assert_close(resumed_adapter[key], full_adapter[key], rtol=0, atol=ATOL)
