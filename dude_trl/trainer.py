"""`DuDeSFTTrainer`: `trl.SFTTrainer` that understands a `DuDeConfig`.

TRL applies PEFT inline in `SFTTrainer.__init__` (`get_peft_model(model, peft_config)`).
A `DuDeConfig` is a `LoraConfig`, so TRL builds PEFT's LoRA/DoRA layers itself, with all its
PEFT handling (ZeRO-3 adapter dtype, input grads under gradient checkpointing, k-bit
preparation); this subclass then initialises those layers in place with `initialize_dude_`.
With a plain `LoraConfig`, another `PeftConfig` or none, nothing differs from `SFTTrainer`.

The trainer's own settings (gradient-norm logging, the in-loop evaluation task) live in
`DuDeSFTConfig`, so YAML files and the command line reach them; a plain `SFTConfig` works too.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import datasets
from trl import SFTTrainer

from .bases.bnb import validate_quantization_config
from .callbacks import EvalCallback, GradNormCallback
from .config import DuDeConfig
from .data import check_disjoint
from .dataset_checks import check_sft_dataset
from .eval import TASKS
from .layers import peft_deprecations_silenced
from .model import initialize_dude_
from .resume import prepare_dude_resume
from .run_record import write_eval_settings
from .sft_config import DuDeSFTConfig

# SFTTrainer's parameters in order, to read the arguments given positionally (`self` left out).
_SFT_PARAMETERS = tuple(inspect.signature(SFTTrainer.__init__).parameters)[1:]


class DuDeSFTTrainer(SFTTrainer):
    """Drop-in replacement for `trl.SFTTrainer`; pass its arguments by keyword.

    Args:
        peft_config: a `DuDeConfig` for DuDe and its baselines; anything else is handed to
            `SFTTrainer` unchanged.
        log_grad_norms: log ``grad_norm/total`` and per-group norms (``grad_norm/magnitude``,
            ``grad_norm/lora_A``, ``grad_norm/lora_B``) on every optimizer step (None: as
            `DuDeSFTConfig.log_grad_norms` says, True with a plain `SFTConfig`).
        *args, **kwargs: exactly `trl.SFTTrainer`'s. With ``args=DuDeSFTConfig(eval_task=...)``
            an `EvalCallback` for that task is added, after checking that none of its questions
            is in ``train_dataset`` (a ValueError names the overlap).

    Before anything loads, ``train_dataset`` and ``eval_dataset`` (each one of a dict) are checked
    (`dude_trl.dataset_checks.check_sft_dataset`): an empty dataset, one without a column SFTTrainer reads,
    or one with a None text / turn content raises a ValueError naming the dataset, the row and the fix.
    """

    def __init__(
        self, *args: Any, peft_config: Any = None, log_grad_norms: Optional[bool] = None, **kwargs: Any
    ) -> None:
        is_dude = isinstance(peft_config, DuDeConfig)
        if is_dude and kwargs.get("quantization_config") is not None:
            # Refuse GPTQ/AWQ/... before TRL loads anything.
            kwargs["quantization_config"] = validate_quantization_config(kwargs["quantization_config"])
        given_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        self._check_datasets({**dict(zip(_SFT_PARAMETERS, args)), **kwargs})
        # Built before the model loads, so an evaluation set that overlaps the training data fails fast.
        eval_callback = self._eval_task_callback(given_args, kwargs.get("train_dataset"))
        with peft_deprecations_silenced():  # TRL wraps the model in PEFT inside
            super().__init__(*args, peft_config=peft_config, **kwargs)
        if is_dude:
            # TRL loaded (and, with a quantization_config, quantized) the base itself; a quantized
            # base reads W0 back from the checkpoint it came from.
            model = kwargs.get("model", args[0] if args else None)
            initialize_dude_(
                self.model,
                "default",
                progress=self.is_world_process_zero(),
                checkpoint=model if isinstance(model, str) else None,
                checkpoint_kwargs=self.args.model_init_kwargs,
            )
        dude_args = self.args if isinstance(self.args, DuDeSFTConfig) else None
        if log_grad_norms is None:
            log_grad_norms = dude_args.log_grad_norms if dude_args is not None else True
        if log_grad_norms:
            GradNormCallback.ensure_attached(self)
        if eval_callback is not None:
            eval_callback.set_trainer(self)
            self.add_callback(eval_callback)

    @staticmethod
    def _check_datasets(given: dict[str, Any]) -> None:
        """`check_sft_dataset` on the train and eval datasets of SFTTrainer's arguments `given`; any
        other type (None, a DatasetDict as train_dataset) is left to SFTTrainer's own errors."""
        args = given.get("args")
        text_field = getattr(args, "dataset_text_field", "text")
        # A formatting_func reads columns of its own; skip_prepare_dataset hands rows to the collator as they are.
        dataset_kwargs = getattr(args, "dataset_kwargs", None) or {}
        check_columns = given.get("formatting_func") is None and not dataset_kwargs.get("skip_prepare_dataset", False)
        eval_dataset = given.get("eval_dataset")
        named = [("train_dataset", given.get("train_dataset"))]
        if isinstance(eval_dataset, dict):  # a DatasetDict too: one evaluation per key, as SFTTrainer runs them
            named += [(f"eval_dataset[{key!r}]", dataset) for key, dataset in eval_dataset.items()]
        else:
            named.append(("eval_dataset", eval_dataset))
        for name, dataset in named:
            if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
                check_sft_dataset(dataset, name, text_field, check_columns=check_columns)

    @staticmethod
    def _eval_task_callback(args: Any, train_dataset: Any) -> Optional[EvalCallback]:
        """The `EvalCallback` a `DuDeSFTConfig` asks for, checked against the training questions."""
        if not isinstance(args, DuDeSFTConfig) or args.eval_task is None:
            return None
        callback = EvalCallback(
            TASKS[args.eval_task](),
            args.eval_task_dataset,
            eval_steps=args.eval_task_steps,
            max_new_tokens=args.eval_task_max_new_tokens,
            batch_size=args.eval_task_batch_size,
            num_samples=args.eval_task_num_samples,
            eval_on_start=args.eval_task_on_start,
            split=args.eval_task_split,
        )
        if isinstance(train_dataset, datasets.Dataset):
            check_disjoint(train_dataset, callback.questions(), callback.task.name)
        return callback

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Trainer's save, plus the in-loop evaluation settings as JSON (`dude_trl.run_record`),
        which the export's model card and ``python -m dude_trl.lm_eval`` read."""
        super()._save(output_dir, state_dict)
        if self.args.should_save and isinstance(self.args, DuDeSFTConfig):
            write_eval_settings(output_dir if output_dir is not None else self.args.output_dir, self.args)

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; when resuming a DuDe run, first rebuild the checkpoint's exact residual
        (a fresh process may have drawn another randomized SVD) and skip half-written checkpoints."""
        return super().train(prepare_dude_resume(self, resume_from_checkpoint), *args, **kwargs)
