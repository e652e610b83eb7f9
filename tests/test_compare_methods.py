"""`benchmarks/compare_methods.py` end to end on a tiny model and two evaluation problems, and its
statistics (`benchmarks/accuracy_stats.py`) on hand-made numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy_stats import describe_run, mean_interval, paired_difference, reference_steps, wilson_interval  # noqa: E402
from compare_methods import default_threshold, steps_to_threshold  # noqa: E402


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


@pytest.mark.slow
def test_compare_methods_runs_every_method_and_skips_finished_runs(tmp_path, tiny_model_dir):
    """Two methods, one seed, 4 steps on the curriculum, 2 problems: the table holds strict and
    flexible accuracy, losses and steps-to-threshold; the curves have >= 4 loss points and an
    accuracy at step 0; a second invocation reuses the finished runs."""
    out = tmp_path / "compare"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "compare_methods.py"), "--task", "curriculum",
        "--output-dir", str(out), "--max-steps", "4", "--seeds", "0", "--methods", "lora", "dude",
        "--model_name_or_path", tiny_model_dir, "--num_train_samples", "16", "--max_length", "128",
        "--per_device_train_batch_size", "2", "--eval_task_num_samples", "2", "--eval_task_max_new_tokens", "8",
        "--eval_task_batch_size", "2", "--lora_r", "4", "--lora_alpha", "8", "--num-evals", "4",
    ]  # fmt: skip
    first = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("lora", 0), ("dude", 0)]
    for run in runs:
        assert len(run["losses"]) == 4 and len(run["grad_norms"]) == 4  # logging every max_steps // 20 = 1 step
        assert run["accuracy_strict_steps"] == run["accuracy_flexible_steps"] == [0, 1, 2, 3, 4]
        assert all(0.0 <= a <= 1.0 for a in run["accuracy_strict"] + run["accuracy_flexible"])
        assert run["wall_seconds"] > 0 and run["train_seconds"] > 0
        samples = [json.loads(line) for line in (out / run["method"] / "seed0" / "gsm8k_samples_step4.jsonl").open()]
        assert len(samples) == 2 and {"prompt", "prediction", "prediction_flexible", "correct_flexible"} <= samples[0].keys()
    lora, dude = runs
    # The pretrained model is evaluated once (first run); the other run's step 0 is that point.
    assert "base_from" not in lora and dude["base_from"] == "lora seed 0"
    assert not (out / "dude" / "seed0" / "gsm8k_samples_step0.jsonl").exists()
    # Both start from the base model's outputs: with the same data order, the same first loss.
    assert dude["losses"][0] == pytest.approx(lora["losses"][0], rel=1e-5)
    # Same rank and targets: DuDe trains LoRA's A and B plus one magnitude per output row (q: 32, v: 16, 2 layers).
    assert dude["trainable_params"] == lora["trainable_params"] + 2 * (32 + 16)
    assert results["threshold"] == pytest.approx(default_threshold(runs))
    table = (out / "results.md").read_text()
    assert "accuracy strict %" in table and "accuracy flexible %" in table and "steps to loss <=" in table
    assert "| lora | 1 |" in table and "| dude | 1 |" in table and "Pretrained model at step 0" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    second = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done before, skipped") == 2
    assert json.loads((out / "results.json").read_text())["runs"] == runs


@pytest.mark.slow
def test_compare_methods_on_a_gsm8k_file_trains_on_all_but_the_dev_slice(tmp_path, tiny_model_dir):
    """`--task gsm8k` trains on `train[:-500]` of the file and evaluates `train[-500:]`: with 502
    rows, 2 train; the trainer's overlap check would refuse the run if the slices shared a question."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus 1?", "answer": f"{i}+1 = {i + 1}\n#### {i + 1}"}) + "\n"
                            for i in range(502)))  # fmt: skip
    out = tmp_path / "compare"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "compare_methods.py"), "--task", "gsm8k", "--gsm8k-file", str(data),
        "--output-dir", str(out), "--max-steps", "2", "--seeds", "0", "--methods", "dude",
        "--model_name_or_path", tiny_model_dir, "--per_device_train_batch_size", "2", "--eval_task_num_samples", "3",
        "--eval_task_max_new_tokens", "4", "--eval_task_batch_size", "3", "--lora_r", "4", "--lora_alpha", "8",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    samples = [json.loads(line) for line in (out / "dude" / "seed0" / "gsm8k_samples_step0.jsonl").open()]
    assert [s["question"] for s in samples] == [f"What is {i} plus 1?" for i in (2, 3, 4)]  # the dev slice's first 3


def test_compare_methods_refuses_a_missing_gsm8k_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_methods.py"), "--task", "gsm8k", "--output-dir",
         str(tmp_path), "--gsm8k-file", str(tmp_path / "nope.jsonl")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "nope.jsonl does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_steps_to_threshold_uses_the_smoothed_loss():
    run = {"loss_steps": [1, 2, 3, 4, 5], "losses": [3.0, 1.0, 3.0, 1.0, 1.0]}
    # Raw losses touch 1.0 at step 2; the 3-point trailing mean first reaches <= 1.7 at step 4.
    assert steps_to_threshold(run, 1.7) == 4
    assert steps_to_threshold(run, 0.5) is None
    assert default_threshold([run, {"loss_steps": [1], "losses": [2.0]}]) == 2.0


def test_wilson_interval_and_paired_difference():
    low, high = wilson_interval(0, 64)
    assert low == 0.0 and 0.05 < high < 0.06  # 0/64: upper bound ~5.7%
    low, high = wilson_interval(32, 64)
    assert low == pytest.approx(0.3810, abs=1e-3) and high == pytest.approx(0.6190, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    before = [False] * 40 + [True] * 10
    after = [True] * 30 + [False] * 10 + [True] * 10  # 30 gained, none lost
    diff, low, high = paired_difference(before, after)
    assert diff == pytest.approx(0.6) and low > 0.45 and high < 0.75
    assert paired_difference(before, before) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference(before, after[:-1])


def test_mean_interval_over_seeds():
    mean, std, low, high = mean_interval([0.50, 0.60, 0.70])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    assert (low, high) == pytest.approx((0.6 - 4.303 * 0.1 / 3**0.5, 0.6 + 4.303 * 0.1 / 3**0.5))
    assert mean_interval([0.4])[:2] == (0.4, 0.0)


def test_describe_run_reads_the_samples_files(tmp_path):
    def write(step, correct):
        rows = [{"reference": "a = 1.\n#### 1" if i % 2 else "a = 1.\nb = 2.\n#### 2", "correct": c, "correct_flexible": True}
                for i, c in enumerate(correct)]  # fmt: skip
        (tmp_path / f"gsm8k_samples_step{step}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(0, [False, False, False, True])
    write(10, [True, True, True, True])
    text = describe_run(tmp_path)
    assert "strict   step     0:   1/4 =  25.0%" in text and "strict   step    10:   4/4 = 100.0%" in text
    assert "strict   change    : +75.0 points" in text and "flexible change    : +0.0 points" in text
    assert "1 step: 1/2 -> 2/2" in text and "2 steps: 0/2 -> 2/2" in text
    assert reference_steps("x\n\ny\n#### 3") == 2
    with pytest.raises(ValueError, match="holds no gsm8k_samples_step"):
        describe_run(tmp_path / "empty")
