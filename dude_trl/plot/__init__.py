"""Training curves of Trainer runs side by side (`curves`); ``python -m dude_trl.plot`` is the CLI."""

from .curves import (
    ACCURACY_KEYS,
    GRAD_NORM_KEYS,
    RunCurves,
    Series,
    accuracy_limits,
    extract_curves,
    find_trainer_state,
    load_run,
    method_label,
    moving_average,
    plot_runs,
)

__all__ = [
    "ACCURACY_KEYS",
    "GRAD_NORM_KEYS",
    "RunCurves",
    "Series",
    "accuracy_limits",
    "extract_curves",
    "find_trainer_state",
    "load_run",
    "method_label",
    "moving_average",
    "plot_runs",
]
