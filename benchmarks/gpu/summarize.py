"""The GPU run's one table: each measured number beside its target (benchmarks/gpu/run.sh).

Reads the stage outputs that run.sh left in a work folder (``tests.xml``, ``model_step.json``,
``model_step_4bit.json``, ``op_counts.json``, ``init_time.json``, ``eval_throughput.json``; a missing one is a row
saying so), prints a Markdown table and writes it to ``summary.md`` with every number in
``results.json``.

    python benchmarks/gpu/summarize.py WORK_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

#: The issue's targets; ratios are against PEFT measured in the same process.
STEP_TARGET, MEMORY_TARGET, QUANT_TARGET, INIT_TARGET_S, EVAL_TARGET = 1.05, 1.03, 1.10, 10.0, 10.0


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_counts(path: Path) -> Optional[dict]:
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def row(what: str, value: Optional[float], target: str, ok: Optional[bool], fmt: str = "{:.3f}") -> list[str]:
    shown = "not measured" if value is None else fmt.format(value)
    verdict = "n/a" if ok is None else ("met" if ok else "**missed**")
    return [what, shown, target, verdict]


def step_rows(data: Optional[dict], group_label: str, reference: str, method: str, time_target: float,
              memory_target: Optional[float]) -> list[list[str]]:
    if data is None:
        return [row(f"{group_label}: {method} vs {reference}", None, "", None)]
    rows = []
    by_key = {(r["checkpointing"], r["method"]): r for r in data["results"]}
    for ckpt in (False, True):
        mine, ref = by_key.get((ckpt, method)), by_key.get((ckpt, reference))
        if mine is None or ref is None:
            continue
        label = f"{group_label}, checkpointing {'on' if ckpt else 'off'}"
        t = mine["step_s"] / ref["step_s"]
        rows.append(row(f"{label}: step time {method} / {reference} ({mine['step_s'] * 1e3:.0f} vs "
                        f"{ref['step_s'] * 1e3:.0f} ms)", t, f"<= {time_target:.2f}", t <= time_target))
        if memory_target is not None and mine.get("peak_gib") and ref.get("peak_gib"):
            m = mine["peak_gib"] / ref["peak_gib"]
            rows.append(row(f"{label}: peak memory {method} / {reference} ({mine['peak_gib']:.1f} vs "
                            f"{ref['peak_gib']:.1f} GiB)", m, f"<= {memory_target:.2f}", m <= memory_target))
    return rows


def summarize(work: Path) -> tuple[list[list[str]], dict[str, Any]]:
    tests = test_counts(work / "tests.xml")
    step = read_json(work / "model_step.json")
    quant = read_json(work / "model_step_4bit.json")
    init = read_json(work / "init_time.json")
    ops = read_json(work / "op_counts.json")
    evals = read_json(work / "eval_throughput.json")
    rows: list[list[str]] = []
    if tests is None:
        rows.append(row("pytest -m gpu", None, "all pass", None))
    else:
        good = tests["failures"] == 0 and tests["errors"] == 0 and tests["passed"] > 0
        rows.append(row(f"pytest -m gpu ({tests['failures']} failed, {tests['errors']} errors, "
                        f"{tests['skipped']} skipped)", tests["passed"], "all pass", good, "{} passed"))
    group = "fp32" if step and "fp32" in {r["group"] for r in step["results"]} else "bf16"
    rows += step_rows(step, f"{group} step", "lora", "dude", STEP_TARGET, MEMORY_TARGET)
    rows += step_rows(step, f"{group} step", "dora", "dude", 1.0, None)  # "faster than PEFT's DoRA"
    rows += step_rows(quant, "4-bit step", "qlora", "qdude", QUANT_TARGET, None)
    if ops is not None and "lora" in ops["op_counts"]:
        counts = ops["op_counts"]
        for method in [m for m in counts if m != "lora"]:
            extra = (counts[method] - counts["lora"]) / ops["layers"]
            rows.append(row(f"operators per step, {method} - lora, per decoder layer ({counts[method]} vs "
                            f"{counts['lora']})", extra, "", None, "{:+.0f}"))
    niters = sorted(k for k in (init or {}) if k.startswith("randomized_niter"))
    if not niters:
        rows.append(row("q/v init, randomized SVD", None, f"<= {INIT_TARGET_S:.0f} s", None))
    for key in niters:
        seconds = init[key]
        rows.append(row(f"{init['model']} q/v init ({init['layers']} layers), randomized SVD "
                        f"(svd_niter={key.removeprefix('randomized_niter').removesuffix('_s')})",
                        seconds, f"<= {INIT_TARGET_S:.0f} s", seconds <= INIT_TARGET_S, "{:.2f} s"))
    if evals is None:
        rows.append(row("eval throughput, batch 16 / batch 1", None, f">= {EVAL_TARGET:.0f}x", None))
    else:
        last = list(evals["speedup"])[-1]
        speedup = evals["speedup"][last]
        rows.append(row(f"eval throughput, batch {last} / batch 1 ({evals['model']})", speedup,
                        f">= {EVAL_TARGET:.0f}x", speedup >= EVAL_TARGET, "{:.2f}x"))
    results = {"tests": tests, "model_step": step, "model_step_4bit": quant, "op_counts": ops, "init_time": init,
               "eval_throughput": evals}
    return rows, results


def markdown(rows: list[list[str]]) -> str:
    lines = ["| what | measured | target | |", "|---|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python benchmarks/gpu/summarize.py WORK_DIR OUT_DIR", file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    rows, results = summarize(work)
    table = markdown(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
