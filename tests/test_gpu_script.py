"""benchmarks/gpu/run.sh --smoke: the GPU run's every stage on CPU with tiny shapes, so that the
script a device session runs in one call cannot rot between sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_measures_every_target(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.txt", "results.json", "run.log", "summary.md"]
    summary = (tmp_path / "summary.md").read_text()
    assert "not measured" not in summary, summary
    for label in ("pytest -m gpu", "step time dude / lora", "step time dude / dora",
                  "step time qdude / qlora", "operators per step, dude - lora", "q/v init", "eval throughput"):
        assert label in summary, label
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tests"]["failures"] == results["tests"]["errors"] == 0 and results["tests"]["passed"] >= 19
    methods = {(r["checkpointing"], r["method"]) for r in results["model_step"]["results"]}
    assert methods == {(c, m) for c in (False, True) for m in ("lora", "dora", "dude")}
    assert {r["method"] for r in results["model_step_4bit"]["results"]} == {"qlora", "qdude"}
    assert results["init_time"]["randomized_niter2_s"] > 0
    assert set(results["op_counts"]["op_counts"]) == {"lora", "dora", "dude"}
    assert results["eval_throughput"]["accuracies_equal"]
    assert "one step of dude" in (tmp_path / "profile.txt").read_text()


def test_summary_puts_each_ratio_beside_its_target(tmp_path):
    """CUDA peak memory (absent on CPU) and the verdicts, from a model_step.json as the GPU writes it."""
    sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
    import summarize

    rows = [
        {"group": "bf16", "checkpointing": False, "method": m, "step_s": t, "peak_gib": g}
        for m, t, g in (("lora", 0.100, 40.0), ("dora", 0.120, 42.0), ("dude", 0.104, 41.6))
    ]
    (tmp_path / "model_step.json").write_text(json.dumps({"results": rows}))
    table, results = summarize.summarize(tmp_path)
    text = summarize.markdown(table)
    assert "| bf16 step, checkpointing off: step time dude / lora (104 vs 100 ms) | 1.040 | <= 1.05 | met |" in text
    assert "| bf16 step, checkpointing off: peak memory dude / lora (41.6 vs 40.0 GiB) | 1.040 | <= 1.03 | **missed** |" in text
    assert "step time dude / dora (104 vs 120 ms) | 0.867 | <= 1.00 | met" in text
    assert "| pytest -m gpu | not measured | all pass | n/a |" in text
    assert results["model_step"]["results"] == rows


def test_bad_argument_exits_2():
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--gpu"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
