"""End to end on the real SmolLM2-135M-Instruct weights (`scripts/setup.sh` converts them into
`models/`): DuDe init on real weights, the README's main job, and the method comparison.

Skipped with a reason when the checkpoint is absent (run `scripts/fetch_smollm2.py`).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"

pytestmark = pytest.mark.skipif(
    not (SMOLLM2 / "config.json").exists(),
    reason=f"{SMOLLM2} missing: run `python scripts/fetch_smollm2.py` (part of scripts/setup.sh)",
)

# A short run: tiny data and generation budgets, logging every step.
SHORT_RUN = [
    "--num_train_samples", "16", "--max_length", "128", "--logging_steps", "1", "--save_steps", "2",
    "--eval_task", "gsm8k", "--eval_task_num_samples", "2", "--eval_task_max_new_tokens", "8", "--eval_task_steps", "2", "--eval_task_batch_size", "2",
    "--disable_tqdm", "true",
]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


@pytest.mark.parametrize("method", ["dude", "dude_a"])
def test_real_weights_output_unchanged_at_init(method):
    """On real weights (576-wide, 30 layers) the q/v outputs and the logits at init equal the base
    model's within 1e-5 of their scale in fp32 (exact SVD)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dude_trl import DuDeConfig, get_dude_model

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    base = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    ids = tokenizer(["Natalia sold clips to 48 of her friends in April, and then half as many in May."],
                    return_tensors="pt").input_ids  # fmt: skip
    config = DuDeConfig(method=method, r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_dude_model(copy.deepcopy(base), config, progress=False).eval()

    def outputs(m):
        seen, hooks = {}, []
        for name, module in m.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                key = name.removeprefix("base_model.model.")
                hooks.append(module.register_forward_hook(lambda mod, i, o, key=key: seen.__setitem__(key, o)))
        with torch.no_grad():
            logits = m(ids).logits
        for hook in hooks:
            hook.remove()
        return logits, seen

    expected_logits, expected = outputs(base)
    logits, got = outputs(model)
    assert got.keys() == expected.keys() and len(got) == 60
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5 * value.abs().max().item(), rtol=0, msg=name)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5 * expected_logits.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_readme_main_job_runs_offline(tmp_path):
    """The README's `accelerate launch --config_file examples/configs/accelerate_one_process.yaml
    examples/sft_metamath.py` with the demo config, shortened to 3 steps: trains DuDe on the
    curriculum, evaluates held-out problems in the loop (step 0 included), and writes the adapter,
    trainer_state.json, every sample and curves.png."""
    out = tmp_path / "demo"
    cmd = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
        str(ROOT / "examples" / "configs" / "accelerate_one_process.yaml"),
        str(ROOT / "examples" / "sft_metamath.py"), "--output_dir", str(out), "--max_steps", "3", *SHORT_RUN,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # No notice a user cannot act on: accelerate's guessed launch values, transformers' old name.
    assert "were not passed to `accelerate launch`" not in proc.stderr
    assert "`gradient_checkpointing` is deprecated" not in proc.stderr
    assert "`is_gradient_checkpointing` is deprecated" not in proc.stderr

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "dude" and config["use_dora"] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)
    assert all("grad_norm/magnitude" in row for row in history if "loss" in row)
    # The demo evaluates the held-out curriculum before training, every eval_task_steps, and at the end.
    evals = [row for row in history if "gsm8k/accuracy" in row]
    assert [(row["step"], row["gsm8k/num_samples"]) for row in evals] == [(0, 2), (2, 2), (3, 2)]
    samples = [json.loads(line) for line in (out / "gsm8k_samples_step0.jsonl").open()]
    assert len(samples) == 2 and all(s["reference"].splitlines()[-1].startswith("#### ") for s in samples)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
