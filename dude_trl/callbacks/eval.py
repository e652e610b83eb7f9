"""In-training evaluation of any task, logged through the trainer like any other metric."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..eval.task import EvalTask, evaluate, write_samples_jsonl

logger = logging.getLogger(__name__)


class EvalCallback(TrainerCallback):
    """Evaluates ``task`` during training and logs ``<task.name>/<metric>`` and ``<task.name>/num_samples``.

    Runs at step 0 when ``eval_on_start``, after every ``eval_steps`` optimizer steps,
    and once more at the end of training unless the last step was just evaluated.
    Every rank must run it (it is collective under DDP/DeepSpeed; see
    :func:`dude_trl.eval.generation.generate`).

    How metrics reach the loggers: a callback that adds keys to ``logs`` in
    ``on_log`` is too late, because the reporting integrations (TensorBoard,
    W&B, ...) are registered before user callbacks and have already consumed
    ``logs``. The metrics therefore go through ``Trainer.log``, which appends to
    ``state.log_history`` and dispatches ``on_log`` to every callback. It is the
    base ``transformers.Trainer.log``, called unbound: TRL's ``SFTTrainer.log``
    merges and clears its accumulated training metrics (``entropy``,
    ``mean_token_accuracy``), which would then land on this row and be missing
    from the next loss row. ``on_log`` dispatch clears ``control.should_log``,
    so the callback restores it: the trainer's own loss row for an evaluation
    step is still written. The
    ``CallbackHandler`` of transformers 5.23 does not hand the trainer to
    callbacks, so the callback binds it itself: ``set_trainer(trainer)`` (the
    convention of transformers' own ``JITCheckpointCallback``) binds it
    explicitly; otherwise, on ``on_init_end``/``on_train_begin``, it looks up the
    call stack for the ``Trainer`` whose ``callback_handler`` holds this
    callback -- those events are always dispatched from a ``Trainer`` method. So a
    plain ``SFTTrainer(callbacks=[EvalCallback(...)])`` or
    ``trainer.add_callback(...)`` works unchanged.

    Sample records (``task.sample``) are written on the main process to
    ``<output_dir>/<task.name>_samples_step<N>.jsonl`` and, when ``wandb`` is among
    ``report_to`` and a run is active, logged as a ``wandb.Table``.

    Args:
        task: what to evaluate.
        dataset: the task's evaluation data, or a name/path for ``task.load``
            (None: the task's default data).
        eval_steps: evaluate every this many optimizer steps.
        max_new_tokens, batch_size, num_samples, use_chat_template: passed to
            :func:`dude_trl.eval.task.evaluate` (``max_new_tokens=None``: the task's own).
        eval_on_start: also evaluate before the first step.
        num_logged_samples: sample records written/logged per evaluation (None: every row).
        tokenizer: overrides the trainer's ``processing_class``.
        split: the split ``task.load`` reads when ``dataset`` is a name or path.
    """

    def __init__(
        self,
        task: EvalTask,
        dataset: Sequence[Any] | str | None = None,
        *,
        eval_steps: int = 200,
        max_new_tokens: int | None = None,
        batch_size: int = 16,
        num_samples: int | None = None,
        eval_on_start: bool = False,
        num_logged_samples: int | None = None,
        tokenizer: Any = None,
        use_chat_template: bool | None = None,
        split: str | None = None,
    ):
        if eval_steps <= 0:
            raise ValueError(f"eval_steps must be positive, got {eval_steps}")
        if dataset is None or isinstance(dataset, str):
            dataset = task.load(dataset, num_samples=num_samples, split=split)
        self.task = task
        self.dataset = dataset
        self.eval_steps = eval_steps
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.eval_on_start = eval_on_start
        self.num_logged_samples = num_logged_samples
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.trainer: Trainer | None = None
        self.last_evaluated_step: int | None = None
        self.history: list[dict[str, Any]] = []

    def questions(self) -> list[str]:
        """The question text of every row evaluated, for the task that has one (see ``EvalTask.question``)."""
        rows = self.task.rows(self.dataset)
        if self.num_samples is not None:
            rows = rows[:self.num_samples]
        return [q for q in map(self.task.question, rows) if q is not None]

    # --- binding to the trainer --------------------------------------------------------------

    def set_trainer(self, trainer: Trainer) -> None:
        """Bind the trainer whose ``log`` carries the metrics (done automatically otherwise)."""
        self.trainer = trainer

    def _find_trainer(self) -> Trainer | None:
        """The ``Trainer`` on the call stack whose callback handler holds this callback."""
        frame = inspect.currentframe()
        try:
            while frame is not None:
                candidate = frame.f_locals.get("self")
                if isinstance(candidate, Trainer) and any(
                    cb is self for cb in candidate.callback_handler.callbacks
                ):
                    return candidate
                frame = frame.f_back
        finally:
            del frame
        return None

    def _bind(self) -> None:
        if self.trainer is None:
            self.trainer = self._find_trainer()

    # --- events ----------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._bind()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._bind()
        if self.trainer is None:
            logger.warning(
                "%s found no Trainer to log through; call set_trainer(trainer). "
                "Metrics will only be appended to state.log_history.", type(self).__name__,
            )
        if self.eval_on_start and state.global_step == 0:
            self._run(args, state, control, **kwargs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # DefaultFlowCallback runs earlier and sets should_training_stop on the last step.
        if state.global_step % self.eval_steps == 0 or control.should_training_stop:
            self._run(args, state, control, **kwargs)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Training can also stop after this callback's on_step_end ran (a later callback, epoch end).
        if self.last_evaluated_step != state.global_step:
            self._run(args, state, control, **kwargs)

    # --- evaluation and logging -------------------------------------------------------------------

    def _resolve_tokenizer(self, kwargs: dict[str, Any]) -> Any:
        candidates = (self.tokenizer, kwargs.get("processing_class"), kwargs.get("tokenizer"))
        tokenizer = next((t for t in candidates if t is not None), None)
        if tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} needs a tokenizer: pass tokenizer= or a trainer processing_class"
            )
        # Multimodal processors wrap the text tokenizer.
        return getattr(tokenizer, "tokenizer", tokenizer)

    def _run(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.last_evaluated_step == state.global_step:
            return
        self.last_evaluated_step = state.global_step
        result = evaluate(
            kwargs["model"],
            self._resolve_tokenizer(kwargs),
            self.task,
            self.dataset,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            num_samples=self.num_samples,
            use_chat_template=self.use_chat_template,
            progress=not args.disable_tqdm,
            num_returned_samples=self.num_logged_samples,
        )
        metrics = {f"{self.task.name}/{key}": value for key, value in result["metrics"].items()}
        self.history.append({"step": state.global_step, **metrics})
        self._log_metrics(metrics, state, control)
        if state.is_world_process_zero:
            self._write_samples(result["samples"], args, state.global_step)

    def _log_metrics(self, metrics: dict[str, float], state: TrainerState, control: TrainerControl) -> None:
        if self.trainer is not None:
            should_log = control.should_log
            Trainer.log(self.trainer, dict(metrics))
            control.should_log = self.trainer.control.should_log = should_log
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def _write_samples(self, samples: list[dict[str, Any]], args: TrainingArguments, step: int) -> None:
        path = os.path.join(args.output_dir, f"{self.task.name}_samples_step{step}.jsonl")
        write_samples_jsonl(samples, path)
        if "wandb" in (args.report_to or []):
            _log_wandb_table(samples, step, self.task.name)


def _log_wandb_table(samples: list[dict[str, Any]], step: int, task_name: str) -> None:
    """Log sample records as a W&B table when wandb is installed and a run is active."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    columns = ["step", *(samples[0] if samples else ())]
    table = wandb.Table(columns=columns)
    for sample in samples:
        table.add_data(step, *(sample[c] for c in columns[1:]))
    # WandbCallback plots against "train/global_step"; give the table the same x value.
    wandb.log({f"{task_name}/samples": table, "train/global_step": step})
