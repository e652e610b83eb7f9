"""Train LoRA, DoRA, PiSSA, DuDe, DuDe_A and DuDe_B under identical settings, over several seeds.

    python benchmarks/compare_methods.py --output-dir runs/compare --max-steps 60 --seeds 0 1 \\
        [--methods dude lora ...] [any flag of examples/sft_metamath.py]

Each (method, seed) trains in its own process through `examples/sft_metamath.py`. Runs with the
same seed share the data order (`--seed` and `--data_seed`), rank, learning rate and schedule. The
method is the only difference. Writes `DIR/results.json`, `DIR/results.md` (mean +/- std over
seeds) and `DIR/curves.png` (loss and gradient norm, mean over seeds with a min-max band).

Runs continue where a previous invocation stopped:
- a finished run (its `run_result.json` exists) is skipped;
- an interrupted run resumes from its newest checkpoint.

Defaults train offline on the demo model and synthetic data. This is the paper's setting:

    python benchmarks/compare_methods.py --output-dir runs/paper --max-steps 1000 --seeds 0 1 2 \\
        --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name meta-math/MetaMathQA \\
        --learning_rate 2e-5 --eval_task gsm8k --eval_task_dataset openai/gsm8k --eval_task_num_samples 500
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from dude_trl.resume import last_complete_checkpoint

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sft_metamath.py"
METHODS = ("lora", "dora", "pissa", "dude", "dude_a", "dude_b")
COLORS = {"lora": "tab:blue", "dora": "tab:orange", "pissa": "tab:green", "dude": "tab:red",
          "dude_a": "tab:purple", "dude_b": "tab:brown"}
# Baselines dashed: a method whose curve coincides with another's (lora/dora, pissa/dude early on) stays visible.
LINESTYLES = {"lora": "--", "pissa": "--"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--launcher", default=sys.executable,
        help="command that runs the example, e.g. 'accelerate launch --config_file deepspeed_configs/...'",
    )
    return parser.parse_known_args(argv)


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the logged history, in step order."""
    rows = [(h["step"], float(h[key])) for h in log_history if key in h]
    return [s for s, _ in rows], [v for _, v in rows]


def count_trainable(adapter_file: Path) -> int:
    """Trainable parameters from the saved adapter: A, B and the magnitude (not the init factors)."""
    from safetensors.torch import load_file

    trainable = ("lora_A", "lora_B", "lora_magnitude_vector")
    return sum(t.numel() for k, t in load_file(str(adapter_file)).items() if any(n in k for n in trainable))


def summarize_run(method: str, seed: int, run_dir: Path) -> dict[str, Any]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    history = state["log_history"]
    loss_steps, losses = series(history, "loss")
    grad_key = "grad_norm/total" if any("grad_norm/total" in h for h in history) else "grad_norm"
    grad_steps, grad_norms = series(history, grad_key)
    _, accuracies = series(history, "gsm8k/accuracy")
    runtime = [h["train_runtime"] for h in history if "train_runtime" in h]
    return {
        "method": method,
        "seed": seed,
        "loss_steps": loss_steps,
        "losses": losses,
        "grad_norm_steps": grad_steps,
        "grad_norms": grad_norms,
        "gsm8k_accuracy": accuracies[-1] if accuracies else None,
        "gsm8k_accuracy_curve": accuracies,
        "train_seconds": sum(runtime) if runtime else None,
        "trainable_params": count_trainable(run_dir / "adapter_model.safetensors"),
    }


def run_one(method: str, seed: int, args: argparse.Namespace, passthrough: list[str]) -> dict[str, Any]:
    run_dir = args.output_dir / method / f"seed{seed}"
    result_file = run_dir / "run_result.json"
    if result_file.exists():
        print(f"[compare] {method} seed {seed}: done before, skipped", flush=True)
        return json.loads(result_file.read_text())
    cmd = [*shlex.split(args.launcher), str(EXAMPLE), *passthrough,
           "--method", method, "--seed", str(seed), "--data_seed", str(seed),
           "--output_dir", str(run_dir), "--max_steps", str(args.max_steps), "--plot", "false"]
    checkpoint = last_complete_checkpoint(run_dir)
    if checkpoint is not None:
        cmd += ["--resume_from_checkpoint", str(checkpoint)]
    print(f"[compare] {method} seed {seed}: {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = summarize_run(method, seed, run_dir)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def value_at_fraction(run: dict[str, Any], fraction: float) -> float:
    """The logged loss at the step closest to `fraction` of the run."""
    target = fraction * run["loss_steps"][-1]
    index = min(range(len(run["loss_steps"])), key=lambda i: abs(run["loss_steps"][i] - target))
    return run["losses"][index]


def mean_std(values: list[Optional[float]]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def results_table(runs: list[dict[str, Any]], methods: list[str]) -> str:
    lines = [
        "| method | seeds | trainable params | loss @25% | loss @50% | final loss | GSM8K accuracy | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        lines.append(
            f"| {method} | {len(rs)} | {rs[0]['trainable_params']:,} | "
            f"{mean_std([value_at_fraction(r, 0.25) for r in rs])} | {mean_std([value_at_fraction(r, 0.5) for r in rs])} | "
            f"{mean_std([r['losses'][-1] for r in rs])} | {mean_std([r['gsm8k_accuracy'] for r in rs])} | "
            f"{mean_std([r['train_seconds'] for r in rs])} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict[str, Any]], methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (step_key, value_key, title) in zip(
        axes, [("loss_steps", "losses", "training loss"), ("grad_norm_steps", "grad_norms", "gradient norm (pre-clip)")]
    ):
        for method in methods:
            rs = [r for r in runs if r["method"] == method and r[value_key]]
            if not rs:
                continue
            length = min(len(r[value_key]) for r in rs)
            steps = rs[0][step_key][:length]
            columns = list(zip(*(r[value_key][:length] for r in rs)))
            mean = [statistics.mean(c) for c in columns]
            ax.plot(steps, mean, color=COLORS[method], linestyle=LINESTYLES.get(method, "-"), label=f"{method} (n={len(rs)})")
            ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=COLORS[method], alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title}: mean over seeds, band = min..max")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    args, passthrough = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_one(m, s, args, passthrough) for s in args.seeds for m in args.methods]
    (args.output_dir / "results.json").write_text(json.dumps({"runs": runs}, indent=1))
    table = results_table(runs, args.methods)
    header = f"{len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}), {args.max_steps} steps, extra flags: `{shlex.join(passthrough)}`\n\n"
    (args.output_dir / "results.md").write_text(header + table)
    plot_curves(runs, args.methods, args.output_dir / "curves.png")
    print(header + table)
    print(f"Wrote {args.output_dir}/results.json, results.md, curves.png")


if __name__ == "__main__":
    main(sys.argv[1:])
