"""Plot training curves of one or more runs side by side (``python -m dude_trl.plot`` is the CLI).

Each run directory is what `Trainer.save_state()` / checkpointing leaves behind: the
curves come from ``RUN_DIR/trainer_state.json`` or, when that is missing, from the newest
``RUN_DIR/checkpoint-*/trainer_state.json``.  The figure has three panels against the
optimizer step: training loss, gradient norm (``grad_norm/total`` logged by
`GradNormCallback`, else the Trainer's ``grad_norm``) and GSM8K accuracy
(``gsm8k/accuracy``).  Runs are labelled by method, read from ``adapter_config.json``.
Rendering uses matplotlib's Agg canvas only, so it works headless and never touches the
global pyplot state.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

GRAD_NORM_KEYS = ("grad_norm/total", "grad_norm")
ACCURACY_KEYS = ("gsm8k/accuracy", "eval_gsm8k/accuracy")
FLEXIBLE_ACCURACY_KEYS = ("gsm8k/accuracy_flexible", "eval_gsm8k/accuracy_flexible")


@dataclass
class Series:
    """One curve: x (optimizer steps) and y values of equal length."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def append(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)


@dataclass
class RunCurves:
    """The curves of one run, as read from its trainer state."""

    label: str
    loss: Series
    grad_norm: Series
    grad_norm_key: str | None
    accuracy: Series
    accuracy_flexible: Series = field(default_factory=Series)


def find_trainer_state(run_dir: str | Path) -> Path:
    """``run_dir/trainer_state.json``, else the one of the highest-step checkpoint.

    Raises:
        FileNotFoundError: if neither exists.
    """
    run_dir = Path(run_dir)
    top = run_dir / "trainer_state.json"
    if top.is_file():
        return top
    candidates = [p for p in run_dir.glob("checkpoint-*/trainer_state.json") if p.is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"No trainer_state.json in {run_dir} nor in any {run_dir}/checkpoint-*/ "
            "(is this a Trainer output_dir? the state is written by trainer.save_state() or at checkpoints)"
        )
    return max(candidates, key=_checkpoint_step)


def _checkpoint_step(state_path: Path) -> tuple[int, float]:
    match = re.fullmatch(r"checkpoint-(\d+)", state_path.parent.name)
    return (int(match.group(1)) if match else -1, state_path.stat().st_mtime)


def method_label(run_dir: str | Path) -> str:
    """Label of a run: ``method`` from ``adapter_config.json`` (DuDe configs), else
    ``dora``/``lora`` from ``use_dora``, else the directory name."""
    run_dir = Path(run_dir)
    for config_path in [run_dir / "adapter_config.json", *sorted(run_dir.glob("checkpoint-*/adapter_config.json"))]:
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            if config.get("method"):
                return str(config["method"])
            if "use_dora" in config:
                return "dora" if config["use_dora"] else "lora"
    return run_dir.resolve().name


def extract_curves(log_history: Sequence[dict], label: str) -> RunCurves:
    """Split a Trainer ``log_history`` into loss, gradient-norm and accuracy series.

    Training rows carry ``loss``; the gradient norm is ``grad_norm/total`` when any row
    has it (pre-clip, logged by `GradNormCallback`), else ``grad_norm``; accuracy is
    ``gsm8k/accuracy`` (strict) and ``gsm8k/accuracy_flexible`` (or their ``eval_`` forms)
    from whichever rows hold them.
    """
    present = {key for row in log_history for key in row}
    grad_key = next((k for k in GRAD_NORM_KEYS if k in present), None)
    acc_key = next((k for k in ACCURACY_KEYS if k in present), None)
    flexible_key = next((k for k in FLEXIBLE_ACCURACY_KEYS if k in present), None)
    curves = RunCurves(label=label, loss=Series(), grad_norm=Series(), grad_norm_key=grad_key, accuracy=Series())
    for row in log_history:
        step = row.get("step")
        if step is None:
            continue
        for series, key in ((curves.loss, "loss"), (curves.grad_norm, grad_key), (curves.accuracy, acc_key),
                            (curves.accuracy_flexible, flexible_key)):  # fmt: skip
            if key is not None and _is_number(row.get(key)):
                series.append(int(step), float(row[key]))
    return curves


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # drops NaN


def load_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    """Read the curves of `run_dir` (see `find_trainer_state`), labelled `label` or by method."""
    state = json.loads(find_trainer_state(run_dir).read_text())
    return extract_curves(state.get("log_history", []), label or method_label(run_dir))


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (shorter at the start); 1 = unchanged."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _unique_labels(labels: list[str], run_dirs: Sequence[str | Path]) -> list[str]:
    """Append the directory name to labels shared by several runs (two `dude` runs, say)."""
    return [
        f"{label} ({Path(d).resolve().name})" if labels.count(label) > 1 else label
        for label, d in zip(labels, run_dirs)
    ]


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_path: str | Path,
    labels: Sequence[str] | None = None,
    smooth: int = 1,
) -> Path:
    """Plot loss, gradient norm and GSM8K accuracy of `run_dirs` into one PNG at `out_path`.

    Args:
        run_dirs: Trainer output directories.
        out_path: image path (format from the suffix, PNG recommended).
        labels: one legend label per run; default: the method of each run.
        smooth: trailing moving-average window for loss and gradient norm (1 = raw).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_run(d, None if labels is None else labels[i]) for i, d in enumerate(run_dirs)]
    if labels is None:
        for run, label in zip(runs, _unique_labels([r.label for r in runs], run_dirs)):
            run.label = label

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    # Both gradient-norm keys hold the norm before clipping (the Trainer's `grad_norm` is what
    # clip_grad_norm_ returns), so one title fits either.
    _draw_panel(axes[0], runs, lambda r: r.loss, "Training loss", "loss", "training loss", smooth)
    _draw_panel(axes[1], runs, lambda r: r.grad_norm, "Gradient norm (pre-clip)", "L2 norm", "gradient norm", smooth)
    _draw_panel(axes[2], runs, lambda r: r.accuracy, "GSM8K accuracy (solid: strict, dotted: flexible)",
                "accuracy", "GSM8K accuracy", 1)  # fmt: skip
    for i, run in enumerate(runs):
        flexible = run.accuracy_flexible
        if flexible.steps:
            axes[2].plot(flexible.steps, flexible.values, color=f"C{i % 10}", linestyle=":", marker="s",
                         markersize=3, linewidth=1.4)  # fmt: skip
    if axes[1].has_data() and _wide_range([v for r in runs for v in r.grad_norm.values]):
        axes[1].set_yscale("log")
    if axes[2].has_data():
        axes[2].yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        accuracies = [v for r in runs for v in r.accuracy.values + r.accuracy_flexible.values]
        axes[2].set_ylim(*accuracy_limits(accuracies))
    _align_steps([ax for ax in axes if ax.has_data()])
    _add_legend(fig, axes)
    suffix = f", smoothed over {smooth} logs" if smooth > 1 else ""
    fig.suptitle(f"Training curves: {', '.join(r.label for r in runs)}{suffix}")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    return out_path


def _draw_panel(ax, runs: Sequence[RunCurves], get, title: str, ylabel: str, what: str, window: int) -> None:
    """One line per run with data (markers when sparse); a notice when no run has any."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i, run in enumerate(runs):
        series = get(run)
        if series.steps:
            marker = "o" if len(series.steps) <= 20 else None
            ax.plot(series.steps, moving_average(series.values, window), color=f"C{i % 10}", label=run.label,
                    marker=marker, markersize=4, linewidth=1.6)  # fmt: skip
    if not ax.has_data():
        ax.text(0.5, 0.5, f"no {what} logged", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="0.45")  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])


def accuracy_limits(values: list[float]) -> tuple[float, float]:
    """Y range for accuracies: from 0 up to just above the best value (at least 5%, at most 100%).

    Matplotlib centres a flat line (every run at 0% early in training) on a symmetric range,
    which shows meaningless negative accuracies. The bottom sits 2% of the range below 0 so
    that points at 0% are not cut in half by the axis.
    """
    top = min(1.0, max(0.05, max([0.0, *values]) * 1.1))
    return -0.02 * top, top


def _align_steps(axes) -> None:
    """Give panels with data the same step range, so sparse accuracy points line up with the loss."""
    if len(axes) > 1:
        low = min(ax.get_xlim()[0] for ax in axes)
        high = max(ax.get_xlim()[1] for ax in axes)
        for ax in axes:
            ax.set_xlim(low, high)


def _add_legend(fig, axes) -> None:
    """One legend for the figure, each run once (a run may be missing from some panels)."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   ncols=min(len(entries), 6), frameon=False)  # fmt: skip


def _wide_range(values: Sequence[float]) -> bool:
    """Whether the positive `values` span more than 20x (then a log axis reads better)."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 20
