"""Which model is planned: its config, its exact inventory, and what an adapter trains in it.

``MODEL`` is a bundled short name (``qwen2.5-32b``), its hub id (``Qwen/Qwen2.5-32B``, resolved
offline to the bundled config), a local model directory, a ``config.json`` path, or (online
only) any hub id. The model is then built on the ``meta`` device, so parameter counts are exact
and no weights are read. ``PlanError`` is defined here, the lowest level of the planner, and
raised by every level above it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..methods import METHOD_TABLE, METHODS

MODEL_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "model_configs"
# short name -> (bundled file, hub id). The files hold the published architecture numbers.
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "qwen1.5-7b": ("qwen1.5-7b.json", "Qwen/Qwen1.5-7B"),
    "llama2-13b": ("llama2-13b.json", "meta-llama/Llama-2-13b-hf"),
    "mistral-7b-v0.1": ("mistral-7b-v0.1.json", "mistralai/Mistral-7B-v0.1"),
    "qwen2.5-14b": ("qwen2.5-14b.json", "Qwen/Qwen2.5-14B"),
    "qwen2.5-32b": ("qwen2.5-32b.json", "Qwen/Qwen2.5-32B"),
}
_EXTRA_ALIASES = {"llama-2-13b": "llama2-13b", "llama-2-13b-hf": "llama2-13b", "mistral-7b": "mistral-7b-v0.1"}


class PlanError(ValueError):
    """A planning request that cannot be answered (bad rank, unknown targets, bad topology)."""


# ---------------------------------------------------------------------------------------------
# Config resolution and model inventory
# ---------------------------------------------------------------------------------------------


def bundled_model_names() -> list[str]:
    """Short names of the configs shipped in ``dude_trl/model_configs``."""
    return list(BUNDLED_MODELS)


def _alias_table() -> dict[str, str]:
    table = {name: name for name in BUNDLED_MODELS}
    for name, (_, hub_id) in BUNDLED_MODELS.items():
        table[hub_id.lower()] = name
        table[hub_id.split("/")[-1].lower()] = name
    table.update(_EXTRA_ALIASES)
    return table


def load_model_config(model: str):
    """Return a ``PretrainedConfig`` for ``model`` without touching any weights.

    Resolution order: an existing directory (its ``config.json``) or JSON file; a bundled short
    name or the hub id it stands for (offline); otherwise ``AutoConfig.from_pretrained`` (needs
    the hub unless the id is cached).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise PlanError(f"{path} is a directory without config.json")
        return _config_from_json(config_file)
    if path.is_file():
        return _config_from_json(path)
    short = _alias_table().get(model.lower())
    if short is not None:
        return _config_from_json(MODEL_CONFIGS_DIR / BUNDLED_MODELS[short][0])
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise PlanError(
            f"cannot resolve model {model!r}: not a local dir/config.json, not one of the bundled "
            f"configs {bundled_model_names()}, and the hub lookup failed ({err})"
        ) from err


def _config_from_json(config_file: Path):
    from transformers import AutoConfig

    data = json.loads(Path(config_file).read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise PlanError(f"{config_file} has no 'model_type'")
    return AutoConfig.for_model(model_type, **data)


@dataclass(frozen=True)
class LinearInfo:
    """One ``nn.Linear`` of the base model: qualified name and shape (PyTorch ``out x in``)."""

    name: str
    in_features: int
    out_features: int


@dataclass
class ModelInventory:
    """What the planner needs to know about a model, read from its meta-device instance."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    total_params: int
    linears: list[LinearInfo]
    output_layer: str | None
    param_numels: list[int]
    quantizable: list[bool]
    largest_module_params: int

    @property
    def quantizable_linear_params(self) -> int:
        """Elements of the Linear weights a 4-bit load quantizes (all but the output layer)."""
        return sum(n for n, q in zip(self.param_numels, self.quantizable) if q)


def inspect_model(config) -> ModelInventory:
    """Build the causal-LM for ``config`` on the meta device and take an exact inventory.

    Tied weights are counted once, as ``model.parameters()`` does.
    """
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    output_layer = _output_layer_name(model)
    linears = [
        LinearInfo(name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    quantizable_ids = {
        id(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != output_layer
    }
    params = list(model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return ModelInventory(
        model_type=config.model_type,
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", 4 * text.hidden_size),
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        vocab_size=text.vocab_size,
        total_params=sum(p.numel() for p in params),
        linears=linears,
        output_layer=output_layer,
        param_numels=[p.numel() for p in params],
        quantizable=[id(p) in quantizable_ids for p in params],
        largest_module_params=largest,
    )


def _output_layer_name(model) -> str | None:
    """Qualified name of the output projection (``lm_head``), found by identity, not by name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Adapter targets and trainable parameter counts
# ---------------------------------------------------------------------------------------------


def select_targets(inventory: ModelInventory, target_modules: Sequence[str] | str) -> list[LinearInfo]:
    """The Linear layers PEFT would adapt for ``target_modules``.

    A list entry matches a module whose qualified name equals it or ends with ``.entry`` (PEFT's
    rule); ``"all-linear"`` means every Linear except the output layer, as in PEFT.
    """
    keys = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if keys == ["all-linear"]:
        return [lin for lin in inventory.linears if lin.name != inventory.output_layer]
    chosen = [
        lin for lin in inventory.linears if any(lin.name == key or lin.name.endswith("." + key) for key in keys)
    ]
    if not chosen:
        raise PlanError(
            f"target modules {keys} match no Linear layer of this {inventory.model_type} model; "
            f"available Linear module suffixes: {available_linear_suffixes(inventory)} (or 'all-linear')"
        )
    return chosen


def available_linear_suffixes(inventory: ModelInventory) -> list[str]:
    """Distinct last name components of the model's Linear layers, in model order."""
    return list(dict.fromkeys(lin.name.rsplit(".", 1)[-1] for lin in inventory.linears))


def adapter_param_numels(targets: Sequence[LinearInfo], r: int, method: str) -> list[int]:
    """Numel of every trainable adapter tensor: A (r x in), B (out x r), magnitude (out).

    Raises ``PlanError`` when ``r`` exceeds ``min(in, out)`` of a target: the SVD split of DuDe /
    PiSSA has no more than that many singular triplets.
    """
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if r < 1:
        raise PlanError(f"rank r must be >= 1, got {r}")
    numels: list[int] = []
    for lin in targets:
        if r > min(lin.in_features, lin.out_features):
            raise PlanError(
                f"rank r={r} exceeds min(in, out)={min(lin.in_features, lin.out_features)} "
                f"of {lin.name} ({lin.out_features} x {lin.in_features})"
            )
        numels += [r * lin.in_features, lin.out_features * r]
        if METHOD_TABLE[method].has_magnitude:
            numels.append(lin.out_features)
    return numels


def count_trainable_params(targets: Sequence[LinearInfo], r: int, method: str) -> int:
    """Exact adapter parameter count: ``r*(in+out)`` per target, plus ``out`` with a magnitude."""
    return sum(adapter_param_numels(targets, r, method))

