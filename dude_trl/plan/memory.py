"""The memory model: per-GPU (and per-node CPU) bytes of one training run, from an inventory.

Memory is accounted per GPU from explicit per-state byte costs:

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

``--full-finetune`` trains every parameter instead of adapters: the case DeepSpeed's own estimators
assume (``dude_trl.plan.deepspeed`` compares the two).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..methods import METHOD_TABLE
from .inventory import (
    LinearInfo,
    ModelInventory,
    PlanError,
    adapter_param_numels,
    inspect_model,
    load_model_config,
    select_targets,
)

GIB = 2**30
BF16_BYTES = 2
NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
NF4_DATA_BYTES_PER_PARAM = 4 / 8
NF4_CONSTANT_BYTES_PER_PARAM = (NF4_BITS_PER_PARAM - 4) / 8
CUDA_OVERHEAD_BYTES = 2 * GIB
ZERO3_SUB_GROUP_SIZE = 10**9
LOGIT_BYTES_PER_ENTRY = 10


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
    if targets and METHOD_TABLE[request.method].uses_svd_init:
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
        if METHOD_TABLE[req.method].has_magnitude:
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
