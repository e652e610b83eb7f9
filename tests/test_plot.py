"""dude_trl.plot: trainer-state lookup, curve extraction, labels and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from dude_trl.plot import accuracy_limits, extract_curves, find_trainer_state, load_run, method_label, moving_average, plot_runs
from dude_trl.plot.__main__ import main


def history(n_steps: int = 12, with_total: bool = True, with_accuracy: bool = True) -> list[dict]:
    """A log_history as the Trainer writes it: train rows, GSM8K rows, an eval row, the summary."""
    rows = []
    for step in range(1, n_steps + 1):
        row = {"loss": 3.0 - 0.1 * step, "grad_norm": 2.0 + 0.01 * step, "learning_rate": 1e-4, "step": step}
        if with_total:
            row["grad_norm/total"] = 1.0 + 0.01 * step
        rows.append(row)
        if with_accuracy and step % 4 == 0:
            rows.append({"gsm8k/accuracy": step / 40, "gsm8k/accuracy_flexible": step / 20, "gsm8k/num_samples": 50,
                         "step": step})  # fmt: skip
    rows.append({"eval_loss": 1.0, "step": n_steps})
    rows.append({"train_loss": 2.0, "train_runtime": 1.0, "step": n_steps})
    return rows


def write_run(run_dir: Path, rows: list[dict], adapter_config: dict | None = None, checkpoint: str | None = None):
    state_dir = run_dir / checkpoint if checkpoint else run_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "trainer_state.json").write_text(json.dumps({"log_history": rows, "global_step": rows[-1]["step"]}))
    if adapter_config is not None:
        (run_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    return run_dir


def test_extract_curves_reads_loss_grad_norm_total_and_accuracy():
    curves = extract_curves(history(), "dude")
    assert curves.loss.steps == list(range(1, 13))
    assert curves.loss.values == pytest.approx([3.0 - 0.1 * s for s in range(1, 13)])
    assert curves.grad_norm_key == "grad_norm/total"
    assert curves.grad_norm.values == pytest.approx([1.0 + 0.01 * s for s in range(1, 13)])
    assert curves.accuracy.steps == [4, 8, 12]
    assert curves.accuracy.values == pytest.approx([0.1, 0.2, 0.3])
    assert curves.accuracy_flexible.steps == [4, 8, 12]
    assert curves.accuracy_flexible.values == pytest.approx([0.2, 0.4, 0.6])


def test_extract_curves_falls_back_to_trainer_grad_norm_and_handles_missing_accuracy():
    curves = extract_curves(history(with_total=False, with_accuracy=False), "lora")
    assert curves.grad_norm_key == "grad_norm"
    assert curves.grad_norm.values == pytest.approx([2.0 + 0.01 * s for s in range(1, 13)])
    assert curves.accuracy.steps == []
    nan_row = [{"loss": float("nan"), "step": 1}, {"loss": 1.0, "step": 2}]
    assert extract_curves(nan_row, "x").loss.steps == [2]


def test_find_trainer_state_prefers_top_level_then_highest_checkpoint(tmp_path):
    run = tmp_path / "run"
    write_run(run, history(), checkpoint="checkpoint-200")
    write_run(run, history(4), checkpoint="checkpoint-1000")  # numerically newest, lexicographically not
    assert find_trainer_state(run) == run / "checkpoint-1000" / "trainer_state.json"
    write_run(run, history(2))
    assert find_trainer_state(run) == run / "trainer_state.json"
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        find_trainer_state(tmp_path / "empty")


def test_method_label(tmp_path):
    assert method_label(write_run(tmp_path / "a", history(), {"method": "dude_b", "use_dora": True})) == "dude_b"
    assert method_label(write_run(tmp_path / "b", history(), {"use_dora": True})) == "dora"
    assert method_label(write_run(tmp_path / "c", history(), {"use_dora": False})) == "lora"
    assert method_label(write_run(tmp_path / "my-run", history())) == "my-run"
    assert load_run(tmp_path / "a").label == "dude_b"


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 1) == [1.0, 2.0, 3.0, 4.0]
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == pytest.approx([1.0, 2.0, 4.0, 6.0])


def test_accuracy_axis_never_goes_negative_or_past_100_percent():
    assert accuracy_limits([0.0, 0.0]) == pytest.approx((-0.001, 0.05))
    assert accuracy_limits([]) == pytest.approx((-0.001, 0.05))
    assert accuracy_limits([0.2, 0.5]) == pytest.approx((-0.011, 0.55))
    assert accuracy_limits([0.95, 1.0]) == pytest.approx((-0.02, 1.0))


def test_cli_writes_a_png(tmp_path):
    a = write_run(tmp_path / "a", history(), {"method": "dude"})
    b = write_run(tmp_path / "b", history(with_total=False), {"use_dora": False}, checkpoint="checkpoint-12")
    out = tmp_path / "plots" / "curves.png"
    proc = subprocess.run(
        [sys.executable, "-m", "dude_trl.plot", str(a), str(b), "--out", str(out), "--smooth", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_nontrivial_png(out)


def test_plot_runs_with_an_empty_panel_and_labels(tmp_path):
    run = write_run(tmp_path / "r", history(with_accuracy=False), {"method": "pissa"})
    out = plot_runs([run], tmp_path / "x.png", labels=["my label"])
    assert out == tmp_path / "x.png"
    assert_nontrivial_png(out)


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "No trainer_state.json" in capsys.readouterr().err
    run = write_run(tmp_path / "r", history())
    with pytest.raises(SystemExit):
        main([str(run), "--out", str(tmp_path / "x.png"), "--labels", "a", "b"])
    assert "2 labels for 1 runs" in capsys.readouterr().err


def assert_nontrivial_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 1000
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
