"""Per-group gradient norms of a DuDe/DoRA/LoRA adapter, logged through the Trainer.

`GradNormCallback` logs, for every optimizer step,

- ``grad_norm/total``: the global L2 norm of all trainable gradients, BEFORE clipping;
- ``grad_norm/magnitude``, ``grad_norm/lora_A``, ``grad_norm/lora_B``: the same norm
  restricted to PEFT's ``lora_magnitude_vector`` / ``lora_A`` / ``lora_B`` parameters
  (``lora_embedding_A``/``_B`` count as ``lora_A``/``lora_B``); a group with no
  parameters (e.g. ``magnitude`` for plain LoRA) is not logged;
- ``grad_norm/other``: any other trainable parameter (``modules_to_save``, ...), if any,
  so that ``total**2 == sum(group**2)``;
- with ``per_module=True`` also ``grad_norm/<module>/<group>``, e.g.
  ``grad_norm/q_proj/lora_A``, where ``<module>`` is the adapted module's attribute name.

Where the gradients are read (the hook)
---------------------------------------
In transformers 5.23 ``on_pre_optimizer_step`` fires *after* ``_clip_grad_norm``, and
under DeepSpeed the engine already stepped (and freed the gradients) inside
``accelerator.backward``.  No callback event runs between the last micro-batch's backward
and the clipping, so at ``on_train_begin`` the callback wraps, on the instances only:

- without DeepSpeed: ``trainer.accelerator.clip_grad_norm_``.  The Trainer calls it exactly
  once per optimizer step (with ``max_grad_norm``, or with ``inf`` just to measure), after
  the last micro-batch's backward and after the DDP all-reduce, before anything is clipped:
  the gradients there are the full accumulated ones.  An fp16 ``GradScaler`` has not
  unscaled them yet, so the norms are divided by the current loss scale.
- with DeepSpeed: the engine's ``_take_model_step`` (``step`` on versions without it).
  It runs on every rank at the accumulation boundary, after the ZeRO reduce-scatter and
  before DeepSpeed clips and steps.  ZeRO-1/2/3 keep only a partition of each gradient
  per rank, so the norms are taken of ``deepspeed.utils.safe_get_full_grad(p)``, which
  reassembles the full averaged gradient on every rank; every rank then logs the same
  values.  The fp16 loss scale is divided out.

Both wrappers are removed at ``on_train_end``.  If a step was not measured by a wrapper
(e.g. a Trainer subclass that clips some other way), ``on_pre_optimizer_step`` measures
the gradients it finds there and warns once, since those may already be clipped.

How the values are logged
-------------------------
Adding keys to ``logs`` in ``on_log`` is too late: the Trainer appends ``logs`` to
``state.log_history`` and the reporting integrations (wandb, tensorboard, ...) run their
``on_log`` before user callbacks.  So the callback wraps ``trainer.log`` (instance
attribute, so subclass overrides such as TRL's still run) and merges its values into every
training log (a ``logs`` dict with a ``"loss"`` key) before the original ``log`` runs; the
values then reach ``log_history`` and every backend like the Trainer's own ``grad_norm``.
Each logged value is the MEAN over the optimizer steps since the previous training log
(``logging_steps`` of them), accumulated on-device with no host sync per step.
``callback.last`` holds the values of the most recent step.

Wiring
------
Callbacks are not given the Trainer, so ``GradNormCallback`` finds it in one of two ways:

- explicitly: ``callback.attach(trainer)`` adds the callback to the trainer if needed and
  wraps ``trainer.log``.  A Trainer subclass that wants one by default calls
  ``GradNormCallback.ensure_attached(self)`` at the end of its ``__init__``: it reuses a
  ``GradNormCallback`` the user passed in ``callbacks`` or adds a new one (never two);
- implicitly, for ``SFTTrainer(..., callbacks=[GradNormCallback()])``: at ``on_init_end``
  (or ``on_train_begin`` if added later) it walks up the call stack to the ``Trainer``
  whose callback handler holds it (the handler is called from the Trainer's own methods)
  and attaches itself.

Cost: trainable parameters are grouped once at train begin; each step runs one
``torch._foreach_norm`` over the gradient list and one ``index_add_`` into the groups,
on-device; the host reads the values once per log.  Exceptions: an fp16 GradScaler's
scale is read each step; under ZeRO ``safe_get_full_grad`` costs one collective per
trainable tensor (an all-reduce, or all-gather for ZeRO-3), acceptable for adapters.
Not supported: FSDP (gradients are sharded; a warning is emitted and nothing is logged).
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

PREFIX = "grad_norm"
# PEFT attribute name of an adapter parameter -> logged group.
ADAPTER_GROUPS = {
    "lora_magnitude_vector": "magnitude",
    "lora_A": "lora_A",
    "lora_B": "lora_B",
    "lora_embedding_A": "lora_A",
    "lora_embedding_B": "lora_B",
}
GROUP_ORDER = ("magnitude", "lora_A", "lora_B", "other")


def classify_parameter(name: str) -> tuple[str, str | None]:
    """Return ``(group, module)`` for a parameter name.

    ``group`` is one of ``magnitude``, ``lora_A``, ``lora_B`` or ``other``; ``module`` is the
    attribute name of the adapted module (``q_proj`` in
    ``...self_attn.q_proj.lora_A.default.weight``), or ``None`` for ``other``.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ADAPTER_GROUPS:
            module = parts[i - 1] if i > 0 else None
            return ADAPTER_GROUPS[part], module
    return "other", None


@dataclass
class ParamGroups:
    """Trainable parameters and, per parameter, the row of every metric it contributes to.

    ``metric_names[0]`` is the total; ``group_index[j]`` / ``module_index[j]`` give the rows
    (>= 1) of parameter ``j``'s group and per-module metric (``module_index`` is ``None``
    without ``per_module``; parameters of group ``other`` point at a dummy last row).
    """

    params: list[torch.nn.Parameter]
    metric_names: list[str]
    group_index: torch.Tensor
    module_index: torch.Tensor | None
    device: torch.device
    single_device: bool

    @classmethod
    def from_model(cls, model: torch.nn.Module, per_module: bool) -> "ParamGroups":
        """Group the trainable parameters of `model` once, in `named_parameters` order."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("GradNormCallback: the model has no trainable parameters.")
        labels = [classify_parameter(n) for n, _ in named]
        groups = [g for g in GROUP_ORDER if any(label[0] == g for label in labels)]
        names = [f"{PREFIX}/total"] + [f"{PREFIX}/{g}" for g in groups]
        group_rows = [1 + groups.index(g) for g, _ in labels]

        module_rows = None
        if per_module:
            keys = sorted({(m, g) for g, m in labels if m is not None}, key=lambda k: (k[0], GROUP_ORDER.index(k[1])))
            first = len(names)
            names += [f"{PREFIX}/{m}/{g}" for m, g in keys]
            dummy = len(names)
            module_rows = [first + keys.index((m, g)) if m is not None else dummy for g, m in labels]

        params = [p for _, p in named]
        devices = {p.device for p in params}
        device = params[0].device
        return cls(
            params=params,
            metric_names=names,
            group_index=torch.tensor(group_rows, device=device),
            module_index=None if module_rows is None else torch.tensor(module_rows, device=device),
            device=device,
            single_device=len(devices) == 1,
        )

    def norms(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """Vector of L2 norms, one per metric name, of `grads` (aligned with `params`).

        Missing gradients (``None``) count as zero.  Runs on-device without host syncs.
        """
        present = [j for j, g in enumerate(grads) if g is not None]
        n_rows = len(self.metric_names) + (1 if self.module_index is not None else 0)
        squares = torch.zeros(n_rows, device=self.device, dtype=torch.float32)
        if present:
            tensors = [grads[j] for j in present]
            per_param = torch._foreach_norm(tensors, 2, dtype=torch.float32)
            if not self.single_device:
                per_param = [n.to(self.device) for n in per_param]
            sq = torch.stack(per_param).square()
            if len(present) == len(grads):
                group_index, module_index = self.group_index, self.module_index
            else:
                rows = torch.tensor(present, device=self.device)
                group_index = self.group_index[rows]
                module_index = None if self.module_index is None else self.module_index[rows]
            squares[0] = sq.sum()
            squares.index_add_(0, group_index, sq)
            if module_index is not None:
                squares.index_add_(0, module_index, sq)
        return squares[: len(self.metric_names)].sqrt()


class GradNormCallback(TrainerCallback):
    """Log pre-clipping gradient norms of the DuDe parameter groups at every optimizer step.

    See the module docstring for the hook, the logging mechanism and the wiring.

    Args:
        per_module: also log ``grad_norm/<module>/<group>`` for each adapted module type.

    Attributes:
        last: ``{metric name: value}`` of the most recent optimizer step (empty before one).
    """

    def __init__(self, per_module: bool = False) -> None:
        self.per_module = per_module
        self._trainer_ref: Callable[[], Trainer | None] = lambda: None
        self._groups: ParamGroups | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._last: torch.Tensor | None = None
        self._measured_step: int | None = None
        self._restore: list[Callable[[], None]] = []
        self._warned_fallback = False

    # ---- wiring -------------------------------------------------------------------------

    def attach(self, trainer: Trainer) -> "GradNormCallback":
        """Bind to `trainer`: add this callback to it if missing and route logs through it.

        Wraps ``trainer.log`` once so that pending means are merged into training logs
        before the Trainer records and reports them.  Idempotent; returns ``self``.
        """
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer_ref = weakref.ref(trainer)
        original_log = trainer.log
        if getattr(original_log, "_grad_norm_callback", None) is self:
            return self
        callback_ref = weakref.ref(self)

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            callback = callback_ref()
            if callback is not None and "loss" in logs:
                logs.update(callback.pop_means())
            return original_log(logs, *args, **kwargs)

        log._grad_norm_callback = self
        trainer.log = log
        return self

    @classmethod
    def ensure_attached(cls, trainer: Trainer, per_module: bool = False) -> "GradNormCallback":
        """The trainer's `GradNormCallback` (one passed in ``callbacks`` if any, else a new
        one with `per_module`), attached.  For Trainer subclasses that add one by default."""
        existing = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, cls)), None)
        return (existing or cls(per_module=per_module)).attach(trainer)

    @property
    def trainer(self) -> Trainer | None:
        """The attached trainer, or ``None``."""
        return self._trainer_ref()

    def _attach_from_stack(self) -> bool:
        """Find the Trainer that is calling this callback and attach to it."""
        frame = sys._getframe(1)
        try:
            while frame is not None:
                candidate = frame.f_locals.get("self")
                handler = getattr(candidate, "callback_handler", None) if isinstance(candidate, Trainer) else None
                if handler is not None and any(cb is self for cb in handler.callbacks):
                    self.attach(candidate)
                    return True
                frame = frame.f_back
        finally:
            del frame
        return False

    # ---- values -------------------------------------------------------------------------

    @property
    def metric_names(self) -> list[str]:
        """Names of the logged metrics (known once training began)."""
        return [] if self._groups is None else list(self._groups.metric_names)

    @property
    def last(self) -> dict[str, float]:
        """Values of the most recent optimizer step."""
        if self._last is None or self._groups is None:
            return {}
        return dict(zip(self._groups.metric_names, self._last.tolist()))

    def pop_means(self) -> dict[str, float]:
        """Mean of each metric over the steps recorded since the last call; then reset."""
        if self._count == 0 or self._sum is None or self._groups is None:
            return {}
        means = (self._sum / self._count).tolist()
        self._sum.zero_()
        self._count = 0
        return dict(zip(self._groups.metric_names, means))

    def _record(self, grads: list[torch.Tensor | None], scale: float = 1.0) -> None:
        """Compute the norms of `grads` (divided by the loss `scale`) for the current step."""
        assert self._groups is not None
        values = self._groups.norms(grads)
        if scale != 1.0:
            values = values / scale
        self._last = values
        self._sum = values.clone() if self._sum is None else self._sum.add_(values)
        self._count += 1
        trainer = self.trainer
        self._measured_step = None if trainer is None else trainer.state.global_step

    # ---- gradient hooks -----------------------------------------------------------------

    def _install_hooks(self, trainer: Trainer) -> None:
        accelerator = trainer.accelerator
        engine_wrapper = getattr(accelerator, "deepspeed_engine_wrapped", None)
        if engine_wrapper is not None:
            self._wrap_deepspeed_engine(engine_wrapper.engine)
        elif getattr(trainer, "is_fsdp_enabled", False):
            warnings.warn("GradNormCallback does not support FSDP (sharded gradients); nothing is logged.")
        else:
            self._wrap_clip_grad_norm(accelerator)

    def _wrap_clip_grad_norm(self, accelerator: Any) -> None:
        original = accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            if not self._measured_this_step():
                self._record([p.grad for p in self._groups.params], scale=_amp_loss_scale(accelerator))
            return original(parameters, max_norm, *args, **kwargs)

        accelerator.clip_grad_norm_ = clip_grad_norm_
        self._restore.append(lambda: _restore_attr(accelerator, "clip_grad_norm_", clip_grad_norm_))

    def _wrap_deepspeed_engine(self, engine: Any) -> None:
        from deepspeed.utils import safe_get_full_grad

        name = "_take_model_step" if hasattr(engine, "_take_model_step") else "step"
        original = getattr(engine, name)

        def step(*args: Any, **kwargs: Any) -> Any:
            boundary = name == "_take_model_step" or engine.is_gradient_accumulation_boundary()
            if boundary and not self._measured_this_step():
                grads = [safe_get_full_grad(p) for p in self._groups.params]
                self._record(grads, scale=_deepspeed_loss_scale(engine))
            return original(*args, **kwargs)

        # nn.Module.__setattr__ stores plain functions in the instance __dict__, shadowing the method.
        setattr(engine, name, step)
        self._restore.append(lambda: _restore_attr(engine, name, step))

    def _measured_this_step(self) -> bool:
        trainer = self.trainer
        return trainer is not None and self._measured_step == trainer.state.global_step

    def _remove_hooks(self) -> None:
        while self._restore:
            self._restore.pop()()

    # ---- TrainerCallback events ---------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.trainer is None:
            self._attach_from_stack()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.trainer is None and not self._attach_from_stack():
            warnings.warn(
                "GradNormCallback could not find its Trainer; call `GradNormCallback().attach(trainer)`. "
                "No gradient norms will be logged."
            )
            return
        trainer = self.trainer
        self._remove_hooks()
        self._sum, self._count, self._last, self._measured_step = None, 0, None, None
        if not any(p.requires_grad for p in trainer.model.parameters()):
            warnings.warn("GradNormCallback: the model has no trainable parameters; nothing is logged.")
            self._groups = None
            return
        self._groups = ParamGroups.from_model(trainer.model, self.per_module)
        self._install_hooks(trainer)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        if self._groups is None or self._measured_step == state.global_step or not self._restore:
            return
        trainer = self.trainer
        if trainer is not None and getattr(trainer.accelerator, "deepspeed_engine_wrapped", None) is not None:
            return  # DeepSpeed already stepped; the engine wrapper is the only valid reading.
        if not self._warned_fallback:
            warnings.warn(
                "GradNormCallback: clip_grad_norm_ was not called for this step; reading gradients at "
                "on_pre_optimizer_step, where they may already be clipped."
            )
            self._warned_fallback = True
        self._record([p.grad for p in self._groups.params])

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._remove_hooks()


def _restore_attr(obj: Any, name: str, wrapper: Callable) -> None:
    """Drop our instance-level wrapper `name` from `obj` if it is still the one installed."""
    if obj.__dict__.get(name) is wrapper:
        del obj.__dict__[name]


def _amp_loss_scale(accelerator: Any) -> float:
    """Current fp16 GradScaler scale (gradients are still scaled before clipping), else 1."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _deepspeed_loss_scale(engine: Any) -> float:
    """Loss scale DeepSpeed's fp16 gradients still carry before its step, else 1."""
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        return float(engine.torch_autocast_z0_gradscaler.get_scale())
    if engine.fp16_enabled():
        scale = getattr(engine.optimizer, "loss_scale", 1.0)
        return float(scale) if scale and math.isfinite(float(scale)) else 1.0
    return 1.0
