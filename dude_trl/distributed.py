"""SVD initialisation of many DuDe layers, split across the processes of a distributed run.

Under `torchrun` / `accelerate launch` (DDP, ZeRO-2 or ZeRO-3) every process holds the same
adapted model and must end with the same A, B, residual, magnitude and init buffers. Doing
every SVD on every process is correct but serial: a 32B model has hundreds of large target
layers. Instead the layers are cut into blocks of `world_size` layers; within a block

1. every process gathers the block's base weights (a collective under ZeRO-3; a no-op when
   weights are replicated), so at most `world_size` full layers are materialised at once;
2. process ``k`` decomposes the ``k``-th layer of the block;
3. each layer's float32 ``(A, B)`` is broadcast from the process that computed it;
4. every process writes A, B, the residual ``W0 - s B A`` and the init buffers exactly as
   the serial path does, so all processes hold bit-identical values (the gather
   context re-partitions ZeRO-3 weights from rank 0 on exit).

Layers are ordered by SVD cost before being cut into blocks, so the layers of a block take
about as long as each other and no process idles long at the broadcast. Which process
decomposes a layer never changes the result: the randomized SVD draws from a per-layer
generator seeded by `svd_seed` and the layer's name (`svd.layer_seed`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import gather_params_ctx
from tqdm.auto import tqdm

from .bases.full import FullPrecisionBase
from .config import DuDeConfig
from .layer_init import decompose_layer, init_params, reset_magnitude, weight_to_decompose, write_init_factors
from .layers import weight_shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SVDInitReport:
    """What one process did during the SVD initialisation.

    Attributes:
        rank: this process's rank (0 without torch.distributed).
        world_size: number of processes that shared the work (1: serial).
        num_layers: layers initialised (on every process).
        decomposed: names of the layers whose SVD this process computed.
        seconds: wall time of the whole initialisation on this process.
    """

    rank: int
    world_size: int
    num_layers: int
    decomposed: tuple[str, ...]
    seconds: float


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def svd_cost(out_features: int, in_features: int, r: int, niter: Optional[int], oversample: int = 8) -> float:
    """Relative flop count of `top_r_svd` on an ``out x in`` weight (only ratios matter)."""
    if niter is None:
        return float(out_features) * in_features * min(out_features, in_features)
    q = min(r + oversample, out_features, in_features)
    # Range finder + niter power iterations (two products each) + the small SVD's projection.
    return float(out_features) * in_features * q * (2 * niter + 2)


def assign_svd_work(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Cut layer indices into blocks of at most `world_size`; process ``k`` decomposes the
    ``k``-th layer of each block.

    Layers are sorted by decreasing cost (ties by index, so every process computes the same
    plan), which puts layers of similar cost in the same block.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    return [order[start : start + world_size] for start in range(0, len(order), world_size)]


def rank_share(blocks: Sequence[Sequence[int]], rank: int) -> list[int]:
    """Indices of the layers `rank` decomposes under the plan `blocks` (`assign_svd_work`)."""
    return [block[rank] for block in blocks if rank < len(block)]


def svd_init_layers_(
    layers: Sequence[tuple[str, LoraLayer]],
    adapter_name: str,
    config: DuDeConfig,
    base: FullPrecisionBase,
    *,
    progress: bool = True,
) -> SVDInitReport:
    """SVD-initialise `layers` (``(name, LoRA layer)`` pairs) in place on the base backend
    `base`, and the magnitude when `config` has one.

    With a process group of more than one process, the decompositions are shared between
    the processes (module docstring); every process must call this with the same layers in
    the same order. Without one, every layer is decomposed here, one after the other.
    """
    rank, world_size = rank_and_world_size()
    start = time.perf_counter()
    if world_size == 1:
        decomposed = _serial_init(layers, adapter_name, config, base, progress)
    else:
        decomposed = _split_init(layers, adapter_name, config, base, progress, rank, world_size)
    report = SVDInitReport(rank, world_size, len(layers), tuple(decomposed), time.perf_counter() - start)
    logger.debug(
        "rank %d decomposed %d of %d layers: %s", rank, len(decomposed), len(layers), ", ".join(decomposed),
        extra={"dude_init_report": report},
    )
    if rank == 0:
        logger.info(
            "DuDe SVD init (%s, %s SVD): %d layers in %.2f s on %d process(es), at most %d SVDs per process.",
            config.method, "exact" if config.svd_niter is None else f"randomized, niter={config.svd_niter}",
            len(layers), report.seconds, world_size, math.ceil(len(layers) / world_size) if layers else 0,
        )
    return report


def _progress_bar(total: int, config: DuDeConfig, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=f"DuDe init ({config.method})", disable=not enabled or total == 0, leave=False)


def _serial_init(
    layers: Sequence[tuple[str, LoraLayer]],
    adapter_name: str,
    config: DuDeConfig,
    base: FullPrecisionBase,
    progress: bool,
) -> list[str]:
    with _progress_bar(len(layers), config, progress) as bar:
        for name, module in layers:
            with gather_params_ctx(init_params(module, adapter_name), modifier_rank=0):
                W0 = weight_to_decompose(module, name, adapter_name, base)
                factors = decompose_layer(module, name, adapter_name, config, base, W0)
                write_init_factors(module, adapter_name, factors.A, factors.B, W0, base)
                base.note_initialised(name, module, W0, factors.error)
            if config.has_magnitude:
                reset_magnitude(module, adapter_name)
            bar.update(1)
    return [name for name, _ in layers]


def _split_init(
    layers: Sequence[tuple[str, LoraLayer]],
    adapter_name: str,
    config: DuDeConfig,
    base: FullPrecisionBase,
    progress: bool,
    rank: int,
    world_size: int,
) -> list[str]:
    shapes = [weight_shape(module.get_base_layer()) for _, module in layers]
    lora_ranks = [module.r[adapter_name] for _, module in layers]
    device = _communication_device()
    _check_same_layers_everywhere([name for name, _ in layers], shapes, lora_ranks, device)
    costs = [svd_cost(o, i, r, config.svd_niter, config.svd_oversample) for (o, i), r in zip(shapes, lora_ranks)]
    decomposed: list[str] = []
    with _progress_bar(len(layers), config, progress and rank == 0) as bar:
        for block in assign_svd_work(costs, world_size):
            members = [layers[i] for i in block]
            # One gather per block: ZeRO-3 materialises these weights on every process until the
            # context exits, then re-partitions them from rank 0's copy (identical on all ranks).
            params = [p for _, module in members for p in init_params(module, adapter_name)]
            with gather_params_ctx(params, modifier_rank=0):
                own, own_W0, error = None, None, None
                if rank < len(members):
                    name, module = members[rank]
                    try:
                        own_W0 = weight_to_decompose(module, name, adapter_name, base)
                        own = decompose_layer(module, name, adapter_name, config, base, own_W0)
                        base.note_initialised(name, module, own_W0, own.error)
                    except Exception as err:  # re-raised below, once every rank knows
                        error = err
                    decomposed.append(name)
                _raise_on_every_rank(error, [name for name, _ in members], device)
                for owner, index in enumerate(block):
                    out_features, in_features = shapes[index]
                    name, module = layers[index]
                    A, B = _broadcast_factors(
                        (own.A, own.B) if owner == rank else None, lora_ranks[index], out_features, in_features,
                        src=owner, device=device,
                    )
                    W0 = own_W0 if owner == rank else weight_to_decompose(module, name, adapter_name, base)
                    write_init_factors(module, adapter_name, A.to(W0.device), B.to(W0.device), W0, base)
            if config.has_magnitude:
                for _, module in members:
                    reset_magnitude(module, adapter_name)
            bar.update(len(members))
    return decomposed


def _raise_on_every_rank(error: Optional[BaseException], names: list[str], device: torch.device) -> None:
    """Raise on every process when the decomposition failed on any (CUDA out of memory, an SVD
    that did not converge): otherwise the others would wait in the next broadcast until the
    collective timeout (30 minutes by default) before failing."""
    failed = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(
            f"DuDe SVD init failed on another process (one of the layers {', '.join(names)}); see that process's error."
        )


def _broadcast_factors(
    factors: Optional[tuple[torch.Tensor, torch.Tensor]],
    r: int,
    out_features: int,
    in_features: int,
    *,
    src: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` (``r x in``, ``out x r``, float32) from rank `src`, in one flat broadcast."""
    numel_A = r * in_features
    if factors is not None:
        A, B = factors
        flat = torch.cat([A.reshape(-1), B.reshape(-1)]).to(device=device, dtype=torch.float32)
    else:
        flat = torch.empty(numel_A + out_features * r, dtype=torch.float32, device=device)
    dist.broadcast(flat, src=src)
    return flat[:numel_A].view(r, in_features), flat[numel_A:].view(out_features, r)


def _communication_device() -> torch.device:
    """Where tensors handed to the default process group must live (CPU for gloo/mpi)."""
    backend = str(dist.get_backend()).lower()
    if backend in ("gloo", "mpi"):
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _check_same_layers_everywhere(
    names: Sequence[str], shapes: Sequence[tuple[int, int]], ranks: Sequence[int], device: torch.device
) -> None:
    """Raise on every process if the processes do not hold the same target layers (the block
    collectives would otherwise deadlock or pair up the wrong layers)."""
    digest = hashlib.sha256(repr((list(names), list(shapes), list(ranks))).encode()).digest()
    local = int.from_bytes(digest[:7], "little")  # fits an int64
    bounds = torch.tensor([local, -local], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if bounds[0].item() != local or -bounds[1].item() != local:
        raise ValueError(
            f"The {dist.get_world_size()} processes hold different DuDe target layers (this one has "
            f"{len(names)}); build the same model with the same DuDeConfig on every process."
        )
