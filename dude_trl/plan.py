"""GPU memory planner for DuDe / LoRA-family fine-tuning, from a model config alone.

Run ``python -m dude_trl.plan MODEL [options]``. ``MODEL`` is a bundled short name
(``qwen2.5-32b``), its hub id (``Qwen/Qwen2.5-32B``, resolved offline to the bundled
config), a local model directory, a ``config.json`` path, or (online only) any hub id.

The model is built on the ``meta`` device, so parameter counts are exact and no weights are
read. Memory is then accounted per GPU from explicit per-state byte costs:

Model states (ZeRO terms as in the ZeRO paper; DeepSpeed >= 0.19 layout):
  frozen base weights   bf16, 2 B/param; or 4-bit NF4 (blocksize 64, double quantization):
                        4 + 8/64 + 32/(64*256) = 4.127 bits/param for every ``nn.Linear`` except
                        ``lm_head`` (transformers keeps the output layer unquantized), all other
                        params (embeddings, norms, biases) bf16. ZeRO-3 partitions the packed
                        4-bit data; the quantization constants are not parameters and stay
                        replicated.
  trainable params under DeepSpeed bf16 (the engine casts every param to bf16, the ZeRO
  optimizer keeps fp32 master copies):
        2 (bf16 weight) + 2 (bf16 gradient partition) + 4 (fp32 gradient built for the step)
        + 4 (fp32 master) + 8 (Adam m, v) = 20 B/param.
      ZeRO-1 partitions the fp32 terms, ZeRO-2 also the bf16 gradient, ZeRO-3 also the weights
      (params smaller than ``stage3_param_persistence_threshold`` = 10*hidden stay replicated);
      ZeRO-3 builds the fp32 gradient one ``sub_group_size`` (1e9 elements) at a time.
      ``--offload`` moves fp32 gradient, master and Adam to CPU (and with ZeRO-3 the bf16
      weights too); the bf16 gradient then only lives in the reduce bucket.
  trainable params without DeepSpeed (``--zero-stage 0``: plain Trainer / DDP, AMP): PEFT keeps
      adapters in fp32: 4 (weight) + 4 (gradient) + 8 (Adam) = 16 B/param, plus a 4 B/param DDP
      gradient bucket copy when several GPUs are used.
  ZeRO-3 working set: the 16-bit params of the largest module gathered at once (+ their 16-bit
      gradients when trainable), plus the prefetch bucket (``auto`` = 0.9*hidden^2 elements).
  ZeRO reduce bucket: ``auto`` = hidden^2 elements in bf16.

Activations (bf16, per token, per decoder layer; dropout 0 as in PEFT's default; derived by
listing the tensors autograd saves in a Llama/Qwen2/Mistral layer, in the spirit of
Korthikanti et al. 2022 but for RMSNorm + GQA + gated MLP):
  attention: 4h (fp32 RMSNorm input) + 2h (normed input) + 2h (q) + 4h (k, v after repeat_kv)
             + 2h (attention output)                                   = 14h
  MLP:       4h (fp32 RMSNorm input) + 2h (normed input) + 8i (gate, up, silu(gate), product)
                                                                       = 6h + 8i
  adapters:  per adapted Linear 2r (A output); with a magnitude vector also 2*out (dude_trl's
             forward keeps one tokens x out tensor in the base dtype for the magnitude gradient;
             PEFT's own DoRA keeps several, plus out x in weight copies)
  initial factors: the SVD methods keep A0, B0 as buffers (saved with the adapter, needed to
             rebuild the residual); ZeRO does not partition buffers, so every GPU holds them:
             r*(in+out) per target, in bf16 under DeepSpeed (its engine casts buffers), else fp32.
  attention scores: 0 with SDPA/flash attention (default), 6*heads*seq (fp32 softmax + bf16 copy)
             with ``--attn-implementation eager``.
  With gradient checkpointing (HF checkpoints every decoder layer): L * 2h (layer inputs) + one
  layer recomputed; without: L * layer. Times seq_len * micro_batch.
  Head: final norm 6h plus logits 10 B per (token, vocab) entry: bf16 logits kept in the model
  output (2) + fp32 log-softmax saved by the loss (4) + its fp32 gradient in backward (4).
Fixed allowance: 2 GiB per GPU for the CUDA context, NCCL communicators and allocator slack.

DeepSpeed's estimators (``estimate_zero2/3_model_states_mem_needs``) assume full fine-tuning;
``--full-finetune`` switches the planner to that case and ``--compare-deepspeed`` prints both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import MAGNITUDE_METHODS, METHODS, SVD_METHODS

GIB = 2**30
BF16_BYTES = 2
NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
NF4_DATA_BYTES_PER_PARAM = 4 / 8
NF4_CONSTANT_BYTES_PER_PARAM = (NF4_BITS_PER_PARAM - 4) / 8
CUDA_OVERHEAD_BYTES = 2 * GIB
ZERO3_SUB_GROUP_SIZE = 10**9
LOGIT_BYTES_PER_ENTRY = 10


MODEL_CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
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
        if method in MAGNITUDE_METHODS:
            numels.append(lin.out_features)
    return numels


def count_trainable_params(targets: Sequence[LinearInfo], r: int, method: str) -> int:
    """Exact adapter parameter count: ``r*(in+out)`` per target, plus ``out`` with a magnitude."""
    return sum(adapter_param_numels(targets, r, method))


# ---------------------------------------------------------------------------------------------
# Memory accounting
# ---------------------------------------------------------------------------------------------


@dataclass
class PlanRequest:
    """Everything a plan depends on besides the model itself."""

    r: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    method: str = "dude"
    num_gpus: int = 1
    gpus_per_node: int | None = None
    zero_stage: int = 3
    offload: bool = False
    load_in_4bit: bool = False
    gpu_memory_gb: float = 80.0
    seq_len: int = 1024
    micro_batch: int = 1
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    full_finetune: bool = False

    @property
    def nodes(self) -> int:
        return self.num_gpus // self.local_gpus

    @property
    def local_gpus(self) -> int:
        return self.gpus_per_node or min(self.num_gpus, 8)


@dataclass
class MemoryPlan:
    """The result: exact counts, per-GPU and per-node-CPU byte breakdowns, and the verdict."""

    model: str
    request: PlanRequest
    total_params: int
    trainable_params: int
    adapted_modules: int
    gpu: dict[str, int]
    cpu: dict[str, int]
    model_states_per_gpu: int
    fits: bool = field(init=False)

    def __post_init__(self) -> None:
        self.fits = self.per_gpu_bytes <= self.request.gpu_memory_gb * GIB

    @property
    def per_gpu_bytes(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_bytes_per_node(self) -> int:
        return sum(self.cpu.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: counts, totals, verdict and both breakdowns (bytes)."""
        return {
            "model": self.model,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "adapted_modules": self.adapted_modules,
            "per_gpu_bytes": self.per_gpu_bytes,
            "per_gpu_gib": round(self.per_gpu_bytes / GIB, 3),
            "gpu_memory_bytes": int(self.request.gpu_memory_gb * GIB),
            "fits": self.fits,
            "cpu_bytes_per_node": self.cpu_bytes_per_node,
            "model_states_per_gpu_bytes": self.model_states_per_gpu,
            "breakdown": dict(self.gpu),
            "cpu_breakdown": dict(self.cpu),
            "settings": {**asdict(self.request), "target_modules": list(self.request.target_modules)},
        }


def _validate(request: PlanRequest) -> None:
    """Reject settings that describe no real run, before any model is built."""
    if request.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"--zero-stage must be 0, 1, 2 or 3, got {request.zero_stage}")
    if request.num_gpus < 1 or request.local_gpus < 1 or request.num_gpus % request.local_gpus:
        raise PlanError(
            f"--num-gpus {request.num_gpus} must be a positive multiple of --gpus-per-node {request.local_gpus}"
        )
    if request.offload and request.zero_stage == 0:
        raise PlanError("--offload needs DeepSpeed ZeRO (--zero-stage 1, 2 or 3)")
    if request.full_finetune and request.load_in_4bit:
        raise PlanError("--full-finetune cannot train 4-bit quantized weights")
    if request.attn_implementation not in ("sdpa", "eager"):
        raise PlanError("--attn-implementation must be 'sdpa' or 'eager'")
    if request.seq_len < 1 or request.micro_batch < 1:
        raise PlanError("--seq-len and --micro-batch must be >= 1")


def plan_memory(model: str, request: PlanRequest, inventory: ModelInventory | None = None) -> MemoryPlan:
    """Plan the per-GPU (and per-node CPU) memory of one training run; see the module docstring."""
    _validate(request)
    if inventory is None:
        inventory = inspect_model(load_model_config(model))
    if request.full_finetune:
        targets: list[LinearInfo] = []
        trainable_numels = list(inventory.param_numels)
    else:
        targets = select_targets(inventory, request.target_modules)
        trainable_numels = adapter_param_numels(targets, request.r, request.method)
    gpu: dict[str, int] = {}
    cpu: dict[str, int] = {}
    _add_frozen_weights(inventory, request, gpu, cpu)
    _add_trainable_states(inventory, request, trainable_numels, gpu, cpu)
    if request.method in SVD_METHODS and targets:
        buffer_bytes = BF16_BYTES if request.zero_stage > 0 else 4
        gpu["init_factors"] = buffer_bytes * sum(request.r * (t.in_features + t.out_features) for t in targets)
    _add_zero3_working_set(inventory, request, gpu)
    model_states = sum(gpu.values())
    _add_zero_buffers(inventory, request, gpu)
    gpu["activations"] = activation_bytes(inventory, request, targets)
    gpu["logits"] = head_bytes(inventory, request)
    gpu["cuda_overhead"] = CUDA_OVERHEAD_BYTES
    return MemoryPlan(
        model=model,
        request=request,
        total_params=inventory.total_params,
        trainable_params=sum(trainable_numels),
        adapted_modules=len(targets),
        gpu={k: int(v) for k, v in gpu.items()},
        cpu={k: int(v) for k, v in cpu.items() if v},
        model_states_per_gpu=int(model_states),
    )


def _persistence_threshold(inventory: ModelInventory) -> int:
    """ZeRO-3 keeps params below this many elements unpartitioned (HF's ``auto`` = 10*hidden)."""
    return 10 * inventory.hidden_size


def _split_persistent(numels: Sequence[int], threshold: int) -> tuple[int, int]:
    """(partitioned, persistent) element counts of a parameter list under ZeRO-3."""
    persistent = sum(n for n in numels if n < threshold)
    return sum(numels) - persistent, persistent


def _add_frozen_weights(inv: ModelInventory, req: PlanRequest, gpu: dict, cpu: dict) -> None:
    """Frozen base weights: bf16 or NF4; ZeRO-3 partitions them, ZeRO-3 offload moves them to CPU."""
    if req.full_finetune:
        gpu["frozen_weights"] = 0
        return
    bf16_numels = list(inv.param_numels)
    quantized_data = quant_constants = 0.0
    if req.load_in_4bit:
        quantized_data = inv.quantizable_linear_params * NF4_DATA_BYTES_PER_PARAM
        quant_constants = inv.quantizable_linear_params * NF4_CONSTANT_BYTES_PER_PARAM
        bf16_numels = [n for n, q in zip(inv.param_numels, inv.quantizable) if not q]
    if req.zero_stage < 3:
        gpu["frozen_weights"] = BF16_BYTES * sum(bf16_numels) + quantized_data + quant_constants
        return
    partitioned, persistent = _split_persistent(bf16_numels, _persistence_threshold(inv))
    sharded = (BF16_BYTES * partitioned + quantized_data) / req.num_gpus
    gpu["frozen_weights"] = BF16_BYTES * persistent + quant_constants + (0 if req.offload else sharded)
    if req.offload:
        cpu["frozen_weights"] = sharded * req.local_gpus



def _add_trainable_states(
    inv: ModelInventory, req: PlanRequest, numels: Sequence[int], gpu: dict, cpu: dict
) -> None:
    """Trainable weights, gradients and Adam states, partitioned per ZeRO stage."""
    total = sum(numels)
    n = req.num_gpus
    weight_key = "trainable_weights" if req.full_finetune else "adapter_weights"
    if req.zero_stage == 0:
        gpu[weight_key] = 4 * total
        gpu["gradients"] = 4 * total + (4 * total if n > 1 else 0)
        gpu["optimizer_states"] = 8 * total
        return
    if req.zero_stage == 3:
        partitioned, persistent = _split_persistent(numels, _persistence_threshold(inv))
        gpu[weight_key] = BF16_BYTES * (persistent + (0 if req.offload else partitioned / n))
        if req.offload:
            cpu[weight_key] = BF16_BYTES * partitioned / n * req.local_gpus
    else:
        gpu[weight_key] = BF16_BYTES * total
    # bf16 gradients: whole at ZeRO-1, partitioned from ZeRO-2, only in the reduce bucket when offloaded.
    if req.offload and req.zero_stage >= 2:
        bf16_grads = 0.0
    else:
        bf16_grads = BF16_BYTES * total / (n if req.zero_stage >= 2 else 1)
    optimizer = (4 + 8) * total / n
    if req.offload:
        gpu["gradients"] = bf16_grads
        gpu["optimizer_states"] = 0
        cpu["gradients"] = 4 * total / n * req.local_gpus
        cpu["optimizer_states"] = optimizer * req.local_gpus
        return
    fp32_grad_elems = min(total / n, ZERO3_SUB_GROUP_SIZE) if req.zero_stage == 3 else total / n
    gpu["gradients"] = bf16_grads + 4 * fp32_grad_elems
    gpu["optimizer_states"] = optimizer


def _add_zero3_working_set(inv: ModelInventory, req: PlanRequest, gpu: dict) -> None:
    """ZeRO-3 gathers the full 16-bit params of a module (and its 16-bit grads when trainable)."""
    if req.zero_stage != 3:
        return
    largest = inv.largest_module_params
    grads = largest if req.full_finetune else 0
    gpu["zero3_gathered_params"] = BF16_BYTES * (largest + grads)


def _add_zero_buffers(inv: ModelInventory, req: PlanRequest, gpu: dict) -> None:
    """ZeRO communication buffers at their HF ``auto`` sizes (bf16)."""
    if req.zero_stage == 0:
        return
    h2 = inv.hidden_size**2
    prefetch = 0.9 * h2 if req.zero_stage == 3 else 0
    gpu["zero_buffers"] = BF16_BYTES * (h2 + prefetch)


def layer_activation_bytes_per_token(inv: ModelInventory, req: PlanRequest, targets: Sequence[LinearInfo]) -> float:
    """Bytes autograd keeps per token for one decoder layer (see module docstring)."""
    h, i = inv.hidden_size, inv.intermediate_size
    attention = 14 * h
    mlp = 6 * h + 8 * i
    if req.attn_implementation == "eager":
        attention += 6 * inv.num_heads * req.seq_len
    adapters = 0.0
    layer_targets = [t for t in targets if t.name != inv.output_layer]
    for lin in layer_targets:
        adapters += BF16_BYTES * req.r
        if req.method in MAGNITUDE_METHODS:
            adapters += BF16_BYTES * lin.out_features
    adapters /= max(inv.num_layers, 1)
    return attention + mlp + adapters


def activation_bytes(inv: ModelInventory, req: PlanRequest, targets: Sequence[LinearInfo]) -> int:
    """Decoder-stack activations of one micro-batch, with or without gradient checkpointing."""
    tokens = req.seq_len * req.micro_batch
    per_layer = layer_activation_bytes_per_token(inv, req, targets) * tokens
    if req.gradient_checkpointing:
        checkpoints = inv.num_layers * BF16_BYTES * inv.hidden_size * tokens
        return int(checkpoints + per_layer)
    return int(inv.num_layers * per_layer)


def head_bytes(inv: ModelInventory, req: PlanRequest) -> int:
    """Final norm and logits for the loss: ``tokens * (6h + 10 * vocab)`` bytes."""
    tokens = req.seq_len * req.micro_batch
    return int(tokens * (6 * inv.hidden_size + LOGIT_BYTES_PER_ENTRY * inv.vocab_size))


# ---------------------------------------------------------------------------------------------
# DeepSpeed's own estimators (full fine-tuning only)
# ---------------------------------------------------------------------------------------------


def deepspeed_model_states(inv: ModelInventory, req: PlanRequest) -> dict[str, Any]:
    """DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs`` for this model and topology.

    These are the functions behind ``estimate_zero{2,3}_model_states_mem_needs_all_cold`` (which
    only print). They assume every parameter is trainable. ``additional_buffer_factor=1.0`` so the
    CPU numbers are bare state sizes, comparable with the planner's. ZeRO-1/0 have no estimator.
    """
    if req.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=inv.total_params,
            largest_layer_params=inv.largest_module_params,
            num_gpus_per_node=req.local_gpus,
            num_nodes=req.nodes,
            cpu_offload=req.offload,
            cpu_offload_params=req.offload,
            zero_init=True,
            additional_buffer_factor=1.0,
        )
        name = "estimate_zero3_model_states_mem_needs"
    elif req.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=inv.total_params,
            num_gpus_per_node=req.local_gpus,
            num_nodes=req.nodes,
            cpu_offload=req.offload,
            additional_buffer_factor=1.0,
        )
        name = "estimate_zero2_model_states_mem_needs"
    else:
        raise PlanError("DeepSpeed ships model-state estimators for ZeRO-2 and ZeRO-3 only")
    return {"estimator": name, "gpu_bytes": int(gpu), "cpu_bytes_per_node": int(cpu)}


def compare_with_deepspeed(model: str, req: PlanRequest, inventory: ModelInventory | None = None) -> dict[str, Any]:
    """Planner (full fine-tune accounting) next to DeepSpeed's estimate, model states only."""
    if inventory is None:
        inventory = inspect_model(load_model_config(model))
    full = PlanRequest(**{**asdict(req), "full_finetune": True, "load_in_4bit": False})
    plan = plan_memory(model, full, inventory)
    reference = deepspeed_model_states(inventory, full)
    return {
        **reference,
        "planner_gpu_bytes": plan.model_states_per_gpu,
        "planner_cpu_bytes_per_node": plan.cpu_bytes_per_node,
        "gpu_ratio": plan.model_states_per_gpu / reference["gpu_bytes"],
        "offload": req.offload,
        "total_params": inventory.total_params,
        "largest_layer_params": inventory.largest_module_params,
    }


# ---------------------------------------------------------------------------------------------
# Presentation and CLI
# ---------------------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """Human-readable breakdown of one plan."""
    req = plan.request
    mode = "full fine-tune" if req.full_finetune else f"{req.method} r={req.r} on {','.join(req.target_modules)}"
    zero = f"ZeRO-{req.zero_stage}" if req.zero_stage else "no ZeRO (DDP)"
    lines = [
        f"model {plan.model}: {plan.total_params:,} params; trainable {plan.trainable_params:,} "
        f"({100 * plan.trainable_params / plan.total_params:.3f}%) in {plan.adapted_modules} modules [{mode}]",
        f"{req.num_gpus} GPU(s) ({req.nodes} node(s) x {req.local_gpus}), {zero}"
        f"{' + CPU offload' if req.offload else ''}, {'4-bit NF4' if req.load_in_4bit else 'bf16'} base, "
        f"seq {req.seq_len} x micro-batch {req.micro_batch}, gradient checkpointing "
        f"{'on' if req.gradient_checkpointing else 'off'}, attention {req.attn_implementation}",
        "",
        f"{'component':<24}{'GiB/GPU':>10}{'GiB CPU/node':>14}",
    ]
    for key in dict.fromkeys([*plan.gpu, *plan.cpu]):
        cpu = _gib(plan.cpu[key]) if key in plan.cpu else f"{'-':>8}"
        lines.append(f"{key:<24}{_gib(plan.gpu.get(key, 0)):>10}{cpu:>14}")
    lines.append(f"{'total':<24}{_gib(plan.per_gpu_bytes):>10}{_gib(plan.cpu_bytes_per_node):>14}")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"\n{verdict} in {req.gpu_memory_gb:g} GiB per GPU")
    return "\n".join(lines)


def format_summary(plans: Sequence[MemoryPlan]) -> str:
    """One row per model, for comparing several models under the same settings.

    Columns in GiB per GPU: base weights (frozen weights + ZeRO-3 gathered module), trainable
    states (adapter weights, gradients, optimizer), activations + logits, and the total.
    """
    header = (
        f"{'model':<18}{'params':>16}{'trainable':>13}{'base wts':>9}{'train st.':>10}"
        f"{'activ+logits':>13}{'GiB/GPU':>9}{'CPU GiB/node':>13}  fits"
    )
    rows = [header]
    for plan in plans:
        g = plan.gpu
        states = sum(g.get(k, 0) for k in ("adapter_weights", "trainable_weights", "gradients", "optimizer_states"))
        rows.append(
            f"{plan.model:<18}{plan.total_params:>16,}{plan.trainable_params:>13,}"
            f"{(g['frozen_weights'] + g.get('zero3_gathered_params', 0)) / GIB:>9.2f}{states / GIB:>10.3f}"
            f"{(g['activations'] + g['logits']) / GIB:>13.2f}{plan.per_gpu_bytes / GIB:>9.2f}"
            f"{plan.cpu_bytes_per_node / GIB:>13.2f}  {'yes' if plan.fits else 'NO'}"
        )
    return "\n".join(rows)


def format_comparison(comparison: dict[str, Any]) -> str:
    """Text block for ``--compare-deepspeed``."""
    cpu_note = "" if comparison["offload"] else " (DeepSpeed: load-time copies; planner: steady state)"
    return (
        f"DeepSpeed {comparison['estimator']} (full fine-tune, {comparison['total_params']:,} params, "
        f"largest layer {comparison['largest_layer_params']:,}):\n"
        f"  GPU per device: DeepSpeed {_gib(comparison['gpu_bytes']).strip()} GiB, planner "
        f"{_gib(comparison['planner_gpu_bytes']).strip()} GiB (ratio {comparison['gpu_ratio']:.3f})\n"
        f"  CPU per node:   DeepSpeed {_gib(comparison['cpu_bytes_per_node']).strip()} GiB, planner "
        f"{_gib(comparison['planner_cpu_bytes_per_node']).strip()} GiB{cpu_note}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dude_trl.plan`` command line."""
    p = argparse.ArgumentParser(
        prog="python -m dude_trl.plan",
        description="Per-GPU memory plan for DuDe/LoRA fine-tuning from a model config (no weights).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help=f"bundled name {bundled_model_names()}, its hub id, a local dir or config.json")
    p.add_argument("--r", type=int, default=16, help="adapter rank")
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated suffixes or 'all-linear'")
    p.add_argument("--method", default="dude", choices=METHODS)
    p.add_argument("--num-gpus", type=int, default=1, help="total GPUs (data-parallel world size)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: min(num-gpus, 8)")
    p.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3), help="0 = no DeepSpeed (DDP)")
    p.add_argument("--offload", action="store_true", help="offload optimizer (and with ZeRO-3 params) to CPU")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (QLoRA-style)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="usable memory per GPU, GiB")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=1, help="per-device train batch size")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--full-finetune", action="store_true", help="train every parameter (DeepSpeed's assumption)")
    p.add_argument("--compare-deepspeed", action="store_true",
                   help="also print DeepSpeed's ZeRO-2/3 model-state estimate (full fine-tune basis)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    """Map parsed CLI arguments to a ``PlanRequest``."""
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return PlanRequest(
        r=args.r,
        target_modules=targets,
        method=args.method,
        num_gpus=args.num_gpus,
        gpus_per_node=args.gpus_per_node,
        zero_stage=args.zero_stage,
        offload=args.offload,
        load_in_4bit=args.load_in_4bit,
        gpu_memory_gb=args.gpu_memory_gb,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn_implementation,
        full_finetune=args.full_finetune,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print a table (or JSON) for each model; exit 2 on a planning error."""
    args = build_parser().parse_args(argv)
    request = request_from_args(args)
    try:
        results = []
        for model in args.models:
            inventory = inspect_model(load_model_config(model))
            plan = plan_memory(model, request, inventory)
            comparison = compare_with_deepspeed(model, request, inventory) if args.compare_deepspeed else None
            results.append((plan, comparison))
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        payloads = [{**plan.to_dict(), **({"deepspeed": cmp} if cmp else {})} for plan, cmp in results]
        print(json.dumps(payloads[0] if len(payloads) == 1 else {"plans": payloads}))
        return 0
    if len(results) == 1:
        print(format_plan(results[0][0]))
    else:
        print(format_summary([plan for plan, _ in results]))
    for plan, comparison in results:
        if comparison:
            print(f"\n{plan.model}: " + format_comparison(comparison))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
