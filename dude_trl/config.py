"""`DuDeConfig`: a `peft.LoraConfig` that also says how to initialise the adapter.

DuDe and its baselines differ only in two things: whether a trainable magnitude vector
rescales each output row (DoRA's split) and how A, B and the frozen base are initialised
(Kaiming/zero as in LoRA, or the top-r SVD of the pretrained weight as in PiSSA). Both
are carried by `method`; every `LoraConfig` field keeps its PEFT meaning.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from peft import LoraConfig

from .methods import METHODS, Method, get_method

# What a saved SVD-initialised adapter's `init_lora_weights` holds; PEFT rejects it by name.
SAVED_INIT_MARKER = "dude_trl: load with dude_trl.get_dude_model(base, adapter_dir)"


@dataclass
class DuDeConfig(LoraConfig):
    """Configuration of a DuDe adapter (and of the LoRA/DoRA/PiSSA baselines).

    Args:
        method: ``"dude"`` (sqrt(S) split between B and A), ``"dude_a"`` (singular values in A),
            ``"dude_b"`` (singular values in B), or a baseline: ``"lora"``, ``"dora"``, ``"pissa"``.
        svd_niter: ``None`` for an exact SVD; an integer for a randomized SVD with that many
            power iterations (much faster on large layers, slightly less accurate).
        svd_oversample: extra random directions used by the randomized SVD.
        svd_seed: seed of the randomized SVD. Each layer draws from its own generator seeded
            by this value and the layer's name, so every process computes the same factors.
        quant_iters: on a quantized base, rounds of the QPiSSA/LoftQ-style refinement that
            re-fits A, B to what quantization lost (0: none).

    `use_dora` and `init_lora_weights` are derived from `method`; leave them at their defaults.
    """

    method: str = field(default="dude", metadata={"help": f"One of {METHODS}."})
    svd_niter: Optional[int] = field(
        default=None, metadata={"help": "None: exact SVD; int: randomized SVD with this many power iterations."}
    )
    svd_oversample: int = field(default=8, metadata={"help": "Oversampling of the randomized SVD."})
    svd_seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD (per layer, name-mixed)."})
    quant_iters: int = field(default=0, metadata={"help": "Refinement rounds on a quantized base (0: none)."})
    base_quantization: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Set by dude_trl, not by users: the bitsandbytes scheme of the base the adapter was "
            "initialised on ({'bits', 'quant_type', 'double_quant'}), None for a full-precision base. "
            "A reload checks it, so a QDuDe adapter is never put on a differently quantized residual."
        },
    )

    def __post_init__(self) -> None:
        get_method(self.method)  # a ValueError listing the methods for an unknown one
        if self.init_lora_weights not in (True, "gaussian"):
            raise ValueError(
                f"DuDeConfig initialises the adapter through `method` (got init_lora_weights="
                f"{self.init_lora_weights!r}); leave `init_lora_weights` at its default and pick "
                f"method='pissa' or 'dude' for an SVD initialisation."
            )
        if self.target_parameters:
            # PEFT's ParamWrapper (what target_parameters injects) refuses DoRA's magnitude, PiSSA's
            # SVD split is written for Linear weights, and DuDe's layer checks need a Linear/Conv1D
            # base, so every method fails deep inside PEFT or dude_trl otherwise.
            raise ValueError(
                f"DuDeConfig does not support target_parameters (got {list(self.target_parameters)!r}, "
                f"method={self.method!r}): none of its methods ({', '.join(METHODS)}) adapts a bare nn.Parameter "
                "such as fused MoE expert weights; only PEFT's own LoRA does. Either adapt Linear layers with "
                "target_modules=[...] and leave target_parameters unset, or train those parameters with a plain "
                "peft.LoraConfig(target_parameters=[...]) (DuDeSFTTrainer then behaves as trl.SFTTrainer)."
            )
        wants_magnitude = self.has_magnitude
        if self.use_dora and not wants_magnitude:
            raise ValueError(
                f"use_dora=True contradicts method={self.method!r}, which has no magnitude vector; "
                f"use method='dora' or a DuDe variant instead."
            )
        self.use_dora = wants_magnitude
        if self.svd_niter is not None and self.svd_niter < 0:
            raise ValueError(f"svd_niter must be None (exact SVD) or >= 0, got {self.svd_niter}.")
        if self.svd_oversample < 0:
            raise ValueError(f"svd_oversample must be >= 0 (extra sketch columns), got {self.svd_oversample}.")
        if self.uses_svd_init:
            alphas = {"lora_alpha": self.lora_alpha}
            alphas.update({f"alpha_pattern[{key!r}]": value for key, value in (self.alpha_pattern or {}).items()})
            for name, alpha in alphas.items():
                if not alpha > 0:
                    raise ValueError(
                        f"method={self.method!r} splits the singular values by sqrt(S / s) with s = lora_alpha / r, "
                        f"so {name} must be > 0 (got {alpha})."
                    )
        if self.quant_iters < 0:
            raise ValueError(f"quant_iters must be >= 0, got {self.quant_iters}.")
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict, with `init_lora_weights` set to `SAVED_INIT_MARKER` for the SVD methods.

        Their saved A, B, m belong on the residual ``W0 - s B0 A0``, not on ``W0``: plain
        `PeftModel.from_pretrained(original_base, adapter_dir)` would count the principal part
        twice without a word. With the marker PEFT refuses to load it, naming the loader to use.
        """
        values = super().to_dict()
        if self.uses_svd_init:
            values["init_lora_weights"] = SAVED_INIT_MARKER
        return values

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "DuDeConfig":
        """Build this class from saved fields: PEFT maps ``peft_type="LORA"`` to `LoraConfig`, which
        would drop `method` and the SVD settings in `DuDeConfig.from_pretrained(adapter_dir)`."""
        return dude_config_from_dict(kwargs, cls)

    @property
    def method_spec(self) -> Method:
        """The method table's row for `method`."""
        return get_method(self.method)

    @property
    def uses_svd_init(self) -> bool:
        """True when A, B come from the SVD of the base weight and the base holds the residual."""
        return self.method_spec.uses_svd_init

    @property
    def has_magnitude(self) -> bool:
        """True when the adapter has DoRA's trainable magnitude vector."""
        return self.method_spec.has_magnitude


def dude_config_from_dict(values: dict[str, Any], config_cls: type = DuDeConfig, source: str = "config") -> DuDeConfig:
    """A `DuDeConfig` (or subclass) from the fields of an ``adapter_config.json``.

    PEFT's own `PeftConfig.from_pretrained` maps ``peft_type="LORA"`` to `LoraConfig`, which drops
    `method` and the SVD settings; this keeps them. Fields this version does not know (written by
    a newer PEFT) are dropped with a warning, as PEFT does.
    """
    if "method" not in values:
        raise ValueError(
            f"{source} has no `method` field, so it is not a DuDe adapter (a plain PEFT LoRA/DoRA adapter?). "
            f"Load it with peft.PeftModel.from_pretrained, or save the adapter from a DuDe model."
        )
    if values.get("init_lora_weights") == SAVED_INIT_MARKER:
        values = {**values, "init_lora_weights": True}
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(values) - known - {"runtime_config"})
    if unknown:
        warnings.warn(f"Ignoring fields {unknown} of {source}, unknown to this version of PEFT/dude_trl.")
    return config_cls(**{k: v for k, v in values.items() if k in known})
