"""Train LoRA, DoRA, PiSSA, DuDe, DuDe_A and DuDe_B under identical settings, over seeds, and rank them.

    python benchmarks/compare_methods.py --task curriculum --output-dir runs/curriculum --max-steps 40
    python benchmarks/compare_methods.py --task gsm8k --output-dir runs/gsm8k --max-steps 40 \\
        [--gsm8k-file ../shared/data/gsm8k/train.jsonl]
    python benchmarks/compare_methods.py --task custom --output-dir runs/x [any flag of examples/sft_metamath.py]

Each (method, seed) trains in its own process through `examples/sft_metamath.py` (launched by
`--launcher`), evaluating GSM8K-style accuracy in the loop before training, during it and at the end.
Runs with the same seed share the data order, rank, learning rate and schedule: the method is the
only difference. Tasks:

- ``curriculum``: the package's graded synthetic curriculum (train split), evaluated on 64 held-out
  curriculum problems; a task SmolLM2-135M-Instruct learns on a CPU within minutes.
- ``gsm8k``: real GSM8K from a local copy of its train file: trains on all but its last 500
  problems (``train[:-500]``) and evaluates on those 500 (``train[-500:]``, the dev slice).
- ``custom``: only the flags given, e.g. ``--config examples/configs/paper_mistral_7b.yaml``.

Flags not listed below go to the example and override the task's defaults (`--model_name_or_path`,
`--config`, `--learning_rate`, `--eval_task_num_samples`, ...). Logging is every
``max_steps // 20`` steps (at least 10 loss points), with ``--num-evals`` evaluations during
and at the end of training (default 2).
The pretrained model is evaluated once, at step 0 of the first run (`--base-eval every`: in
every run): every method starts from its output.

Writes `DIR/results.json`, `DIR/results.md` (per method over seeds: strict and flexible accuracy,
mean +- std and the t-based 95% interval of the mean; loss at 25/50/100% of the steps; the first
step at which the smoothed loss reaches a threshold; trainable parameters; wall time) and
`DIR/curves.png` (loss, gradient norm and accuracy per method: mean over seeds, band = min..max).

Runs continue where a previous invocation stopped: a finished run (its `run_result.json`) is
skipped; an interrupted run resumes from its newest complete checkpoint.

The paper's Table 1 shape (MetaMathQA, then GSM8K test) on 8 GPUs with ZeRO-3:

    python benchmarks/compare_methods.py --task custom --output-dir runs/table1 --seeds 0 1 2 \\
        --max-steps 1000 --launcher "accelerate launch --config_file deepspeed_configs/accelerate/zero3_8gpu.yaml" \\
        --config examples/configs/paper_mistral_7b.yaml --eval_task gsm8k --eval_task_dataset openai/gsm8k
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from accuracy_stats import mean_interval

from dude_trl.plot import moving_average
from dude_trl.resume import last_complete_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sft_metamath.py"
DEFAULT_GSM8K_FILE = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
METHODS = ("lora", "dora", "pissa", "dude", "dude_a", "dude_b")
COLORS = {"lora": "tab:blue", "dora": "tab:orange", "pissa": "tab:green", "dude": "tab:red",
          "dude_a": "tab:purple", "dude_b": "tab:brown"}
# Baselines dashed: a method whose curve coincides with another's (lora/dora, pissa/dude early on) stays visible.
LINESTYLES = {"lora": "--", "pissa": "--"}
ACCURACY_KEYS = {"strict": "gsm8k/accuracy", "flexible": "gsm8k/accuracy_flexible"}
SMOOTHING = 3  # logged loss points averaged before the threshold test


def task_flags(task: str, gsm8k_file: Path) -> list[str]:
    """The example's flags for a task; flags given on the command line come later and win."""
    common = ["--eval_task", "gsm8k", "--save_steps", "20", "--disable_tqdm", "true"]
    if task == "curriculum":
        return [*common, "--dataset_name", "curriculum", "--num_train_samples", "1000",
                "--eval_task_dataset", "curriculum", "--eval_task_num_samples", "64",
                "--max_length", "160", "--eval_task_max_new_tokens", "64"]
    if task == "gsm8k":
        return [*common, "--dataset_name", str(gsm8k_file), "--dataset_train_split", "train[:-500]",
                "--eval_task_dataset", str(gsm8k_file), "--eval_task_split", "train[-500:]",
                "--eval_task_num_samples", "100", "--max_length", "384", "--eval_task_max_new_tokens", "256"]
    return ["--disable_tqdm", "true"]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--task", choices=("curriculum", "gsm8k", "custom"), default="curriculum")
    parser.add_argument("--gsm8k-file", type=Path, default=DEFAULT_GSM8K_FILE,
                        help="local GSM8K train.jsonl for --task gsm8k")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--loss-threshold", type=float, default=None,
                        help="loss for 'steps to threshold' (default: the highest final smoothed loss of all runs)")
    parser.add_argument("--num-evals", type=int, default=2, help="evaluations after step 0, evenly spaced")
    parser.add_argument(
        "--base-eval", choices=("first", "every"), default="first",
        help="evaluate at step 0 in the first run only (every method starts from the pretrained model's "
             "output, so its step-0 accuracy is the same; default) or in every run",
    )
    parser.add_argument(
        "--launcher", default=sys.executable,
        help="command that runs the example, e.g. 'accelerate launch --config_file deepspeed_configs/...'",
    )
    args, passthrough = parser.parse_known_args(argv)
    for name in ("max_steps", "num_evals"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.task == "gsm8k" and not args.gsm8k_file.is_file():
        parser.error(f"--gsm8k-file {args.gsm8k_file} does not exist; point it at GSM8K's train.jsonl")
    return args, passthrough


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the logged history, in step order."""
    rows = [(h["step"], float(h[key])) for h in log_history if key in h]
    return [s for s, _ in rows], [v for _, v in rows]


def count_trainable(adapter_file: Path) -> int:
    """Trainable parameters from the saved adapter: A, B and the magnitude (not the init factors)."""
    from safetensors.torch import load_file

    trainable = ("lora_A", "lora_B", "lora_magnitude_vector")
    return sum(t.numel() for k, t in load_file(str(adapter_file)).items() if any(n in k for n in trainable))


def summarize_run(method: str, seed: int, run_dir: Path, wall_seconds: float) -> dict[str, Any]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    loss_steps, losses = series(history, "loss")
    grad_key = "grad_norm/total" if any("grad_norm/total" in h for h in history) else "grad_norm"
    grad_steps, grad_norms = series(history, grad_key)
    result: dict[str, Any] = {
        "method": method, "seed": seed,
        "loss_steps": loss_steps, "losses": losses, "grad_norm_steps": grad_steps, "grad_norms": grad_norms,
        "train_seconds": sum(h["train_runtime"] for h in history if "train_runtime" in h) or None,
        "wall_seconds": wall_seconds,
        "trainable_params": count_trainable(run_dir / "adapter_model.safetensors"),
    }
    for reading, key in ACCURACY_KEYS.items():
        steps, values = series(history, key)
        result[f"accuracy_{reading}_steps"], result[f"accuracy_{reading}"] = steps, values
    return result


def run_one(
    method: str, seed: int, args: argparse.Namespace, passthrough: list[str], eval_on_start: bool
) -> dict[str, Any]:
    run_dir = args.output_dir / method / f"seed{seed}"
    result_file = run_dir / "run_result.json"
    if result_file.exists():
        print(f"[compare] {method} seed {seed}: done before, skipped", flush=True)
        return json.loads(result_file.read_text())
    schedule = ["--logging_steps", str(max(1, args.max_steps // 20)),
                "--eval_task_steps", str(max(1, args.max_steps // args.num_evals)),
                "--eval_task_on_start", str(eval_on_start).lower()]
    cmd = [*shlex.split(args.launcher), str(EXAMPLE), *task_flags(args.task, args.gsm8k_file), *schedule,
           *passthrough, "--method", method, "--seed", str(seed), "--data_seed", str(seed),
           "--output_dir", str(run_dir), "--max_steps", str(args.max_steps), "--plot", "false"]
    checkpoint = last_complete_checkpoint(run_dir)
    if checkpoint is not None:
        cmd += ["--resume_from_checkpoint", str(checkpoint)]
    print(f"[compare] {method} seed {seed}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = summarize_run(method, seed, run_dir, time.perf_counter() - start)
    result_file.write_text(json.dumps(result, indent=1))
    return result


# --- summary ---------------------------------------------------------------------------------------


def loss_at_fraction(run: dict[str, Any], fraction: float) -> float:
    """The logged loss at the step closest to `fraction` of the run."""
    target = fraction * run["loss_steps"][-1]
    index = min(range(len(run["loss_steps"])), key=lambda i: abs(run["loss_steps"][i] - target))
    return run["losses"][index]


def steps_to_threshold(run: dict[str, Any], threshold: float) -> Optional[int]:
    """First logged step at which the smoothed loss is at or below `threshold` (None: never)."""
    for step, loss in zip(run["loss_steps"], moving_average(run["losses"], SMOOTHING)):
        if loss <= threshold:
            return step
    return None


def default_threshold(runs: list[dict[str, Any]]) -> float:
    """The highest final smoothed loss of all runs: a loss every run reaches, some sooner than others."""
    return max(moving_average(r["losses"], SMOOTHING)[-1] for r in runs if r["losses"])


def final_accuracy(run: dict[str, Any], reading: str) -> Optional[float]:
    values = run[f"accuracy_{reading}"]
    return values[-1] if values else None


def base_accuracy(run: dict[str, Any], reading: str) -> Optional[float]:
    """The step-0 accuracy: the pretrained model's, since every method starts from the same output."""
    steps, values = run[f"accuracy_{reading}_steps"], run[f"accuracy_{reading}"]
    return values[0] if steps and steps[0] == 0 else None


def format_interval(values: list[Optional[float]], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std [low, high]`` (t-based 95% interval of the mean over seeds); ``n/a`` without values."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "n/a"
    mean, std, low, high = mean_interval(values)
    interval = f" [{low:.{digits}f}, {high:.{digits}f}]" if len(values) > 1 else ""
    return f"{mean:.{digits}f} ± {std:.{digits}f}{interval}"


def summarize(runs: list[dict[str, Any]], methods: list[str], threshold: float) -> list[dict[str, Any]]:
    """One row per method: the numbers the table shows, over that method's seeds."""
    rows = []
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        reached = [steps_to_threshold(r, threshold) for r in rs]
        rows.append({
            "method": method, "seeds": len(rs), "trainable_params": rs[0]["trainable_params"],
            **{f"accuracy_{reading}": [final_accuracy(r, reading) for r in rs] for reading in ACCURACY_KEYS},
            "loss_25": [loss_at_fraction(r, 0.25) for r in rs], "loss_50": [loss_at_fraction(r, 0.5) for r in rs],
            "loss_100": [loss_at_fraction(r, 1.0) for r in rs],
            "steps_to_threshold": reached, "wall_seconds": [r["wall_seconds"] for r in rs],
        })
    return rows


def results_table(rows: list[dict[str, Any]], threshold: float) -> str:
    lines = [
        "| method | seeds | trainable params | accuracy strict % | accuracy flexible % | loss @25% | loss @50% "
        f"| loss @100% | steps to loss <= {threshold:.3f} | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reached = [s for s in row["steps_to_threshold"] if s is not None]
        reach_text = format_interval(reached, digits=1) if reached else "never"
        if reached and len(reached) < row["seeds"]:
            reach_text += f" ({len(reached)}/{row['seeds']} runs)"
        lines.append(
            f"| {row['method']} | {row['seeds']} | {row['trainable_params']:,} | "
            f"{format_interval(row['accuracy_strict'], 100, 1)} | {format_interval(row['accuracy_flexible'], 100, 1)} | "
            f"{format_interval(row['loss_25'], digits=3)} | {format_interval(row['loss_50'], digits=3)} | "
            f"{format_interval(row['loss_100'], digits=3)} | {reach_text} | {format_interval(row['wall_seconds'], digits=0)} |"
        )
    return "\n".join(lines) + "\n"


def base_line(runs: list[dict[str, Any]]) -> str:
    parts = []
    for reading in ACCURACY_KEYS:
        values = {round(v, 6) for v in (base_accuracy(r, reading) for r in runs) if v is not None}
        if values:
            parts.append(f"{reading} {', '.join(f'{100 * v:.1f}' for v in sorted(values))}%")
    return ("Pretrained model at step 0 (every method starts from its output): " + "; ".join(parts) + "\n") if parts else ""


# --- curves ------------------------------------------------------------------------------------------


def _mean_band(rs: list[dict[str, Any]], step_key: str, value_key: str) -> tuple[list[int], list[float], list, list]:
    length = min(len(r[value_key]) for r in rs)
    columns = list(zip(*(r[value_key][:length] for r in rs)))
    return (rs[0][step_key][:length], [statistics.mean(c) for c in columns],
            [min(c) for c in columns], [max(c) for c in columns])


def plot_curves(runs: list[dict[str, Any]], methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss_steps", "losses", "training loss", 1.0),
              ("grad_norm_steps", "grad_norms", "gradient norm (pre-clip)", 1.0),
              ("accuracy_strict_steps", "accuracy_strict", "accuracy % (solid strict, dotted flexible)", 100.0)]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    for ax, (step_key, value_key, title, scale) in zip(axes, panels):
        for method in methods:
            rs = [r for r in runs if r["method"] == method and r[value_key]]
            if not rs:
                continue
            steps, mean, low, high = _mean_band(rs, step_key, value_key)
            style = dict(color=COLORS[method], marker="o", markersize=3.5)
            ax.plot(steps, [m * scale for m in mean], linestyle=LINESTYLES.get(method, "-"),
                    label=f"{method} (n={len(rs)})", **style)
            ax.fill_between(steps, [v * scale for v in low], [v * scale for v in high], color=COLORS[method], alpha=0.15)
            if value_key == "accuracy_strict":
                steps, mean, _, _ = _mean_band(rs, "accuracy_flexible_steps", "accuracy_flexible")
                ax.plot(steps, [m * scale for m in mean], linestyle=":", **style)
        if not ax.lines:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title}\nmean over seeds, band = min..max", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def share_base_accuracy(runs: list[dict[str, Any]]) -> None:
    """Give runs evaluated only after training the step-0 accuracy measured in another run.

    Every method starts from the pretrained model's output (tested to 1e-5 in fp32), so the
    step-0 evaluation is the same for all; each copied point is marked ``base_from``.
    """
    measured = next((r for r in runs if r["accuracy_strict_steps"][:1] == [0]), None)
    if measured is None:
        return
    for run in runs:
        if run["accuracy_strict_steps"][:1] != [0]:
            for reading in ACCURACY_KEYS:
                run[f"accuracy_{reading}_steps"].insert(0, 0)
                run[f"accuracy_{reading}"].insert(0, measured[f"accuracy_{reading}"][0])
            run["base_from"] = f"{measured['method']} seed {measured['seed']}"


def main(argv: list[str]) -> None:
    args, passthrough = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plan = [(m, s) for s in args.seeds for m in args.methods]
    runs = [run_one(m, s, args, passthrough, eval_on_start=args.base_eval == "every" or i == 0)
            for i, (m, s) in enumerate(plan)]
    share_base_accuracy(runs)
    threshold = args.loss_threshold if args.loss_threshold is not None else default_threshold(runs)
    rows = summarize(runs, args.methods, threshold)
    (args.output_dir / "results.json").write_text(json.dumps({"threshold": threshold, "summary": rows, "runs": runs}, indent=1))
    header = (f"task {args.task}, {len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}), {args.max_steps} steps; "
              f"command: `python benchmarks/compare_methods.py {shlex.join(argv)}`\n\n{base_line(runs)}\n"
              "Accuracy is the last evaluation's; `a ± s [l, h]` is mean ± std over seeds and the t-based 95% "
              "interval of the mean.\n\n")
    table = results_table(rows, threshold)
    (args.output_dir / "results.md").write_text(header + table)
    plot_curves(runs, args.methods, args.output_dir / "curves.png")
    print(header + table)
    print(f"Wrote {args.output_dir}/results.json, results.md, curves.png")


if __name__ == "__main__":
    main(sys.argv[1:])
