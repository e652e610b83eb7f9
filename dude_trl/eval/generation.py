"""Batched, rank-sharded greedy generation, independent of any evaluation task.

``generate`` runs on one process or on every rank of a ``torch.distributed`` job
(DDP or DeepSpeed, ZeRO-3 included): prompts are split across ranks and the
per-rank completions are gathered so that every rank returns the same completions,
in the order of the prompts. What to ask and when a completion is finished comes
from the caller (an evaluation task); this module only knows how to generate.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

# Builds the stopping criteria for one batch from its (left-padded) prompt length.
StoppingFactory = Callable[[int], Sequence[StoppingCriteria]]

# --- model state -------------------------------------------------------------------------------------


@contextmanager
def _generation_mode(model: torch.nn.Module, tokenizer: Any) -> Iterator[None]:
    """Eval mode, KV cache on, left padding and a pad token; all restored afterwards.

    Gradient checkpointing is left enabled: transformers' checkpointed layers only
    recompute in training mode, so eval mode alone turns it off for generation and
    the training setup (hooks, use_reentrant choice) stays untouched.
    """
    was_training = model.training
    config = getattr(model, "config", None)
    had_use_cache = hasattr(config, "use_cache")
    use_cache = getattr(config, "use_cache", None)
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    if had_use_cache:
        config.use_cache = True
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        model.train(was_training)
        if had_use_cache:
            config.use_cache = use_cache
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = pad_token


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _greedy_config(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int) -> GenerationConfig:
    """The model's generation config made greedy, with our length, pad and EOS tokens."""
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if isinstance(base, GenerationConfig) else GenerationConfig()
    config.do_sample, config.num_beams = False, 1
    config.temperature = config.top_p = config.top_k = None
    config.max_new_tokens, config.max_length = max_new_tokens, None
    config.use_cache = True
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = _eos_token_ids(model, tokenizer) or None
    return config


# --- distribution ------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def zero3_enabled() -> bool:
    """Whether a DeepSpeed ZeRO-3 config is active (parameters are partitioned across ranks)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def rank_share(num_items: int, rank: int, world_size: int) -> list[int | None]:
    """Global indices this rank generates for (strided), padded with None to an equal count.

    Every rank gets ``ceil(num_items / world_size)`` slots so that all ranks run the
    same number of ``generate`` calls; ZeRO-3 needs this because every forward pass
    gathers the partitioned parameters collectively. None slots are dummy prompts
    whose results are dropped.
    """
    share: list[int | None] = list(range(rank, num_items, world_size))
    share += [None] * (math.ceil(num_items / world_size) - len(share))
    return share


def _gather(payload: Any, world_size: int) -> list[Any]:
    """Every rank's ``payload``, in rank order (``all_gather_object``; no collective on one process)."""
    if world_size == 1:
        return [payload]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, payload)
    return gathered


# --- generation --------------------------------------------------------------------------------------


def _generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    config: GenerationConfig,
    *,
    stopping: StoppingFactory | None,
    add_special_tokens: bool,
    synced_gpus: bool,
) -> list[str]:
    """Greedy completions (prompt removed, special tokens skipped) for one left-padded batch."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    batch = {key: value.to(_model_device(model)) for key, value in batch.items()}
    prompt_length = batch["input_ids"].shape[1]
    criteria = StoppingCriteriaList(stopping(prompt_length) if stopping is not None else [])
    output = model.generate(
        **batch, generation_config=config, stopping_criteria=criteria, synced_gpus=synced_gpus
    )
    return tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    stopping: StoppingFactory | None = None,
    add_special_tokens: bool = True,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions of ``prompts``, in their order, by batched generation.

    Args:
        model: a transformers causal LM or a ``peft.PeftModel`` wrapping one.
        tokenizer: its tokenizer; padding side and pad token are restored afterwards.
        prompts: the prompt texts (every rank passes the same list).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per ``generate`` call (per rank).
        stopping: builds the stopping criteria of a batch from its padded prompt
            length (EOS and ``max_new_tokens`` always stop a sequence).
        add_special_tokens: whether the tokenizer adds its special tokens (BOS) to
            each prompt; False for prompts rendered by a chat template, which hold them.
        progress: show a tqdm bar (on rank 0).
        desc: the bar's label.

    Returns:
        One completion per prompt: the new tokens decoded without special tokens.

    The model's train/eval mode, ``config.use_cache``, and gradient-checkpointing
    setup are left as they were.

    Distributed: with an initialized process group of size > 1, every rank must
    call this. Prompts are split strided across ranks; each rank's share is padded
    with dummy prompts to the same number of ``generate`` calls, because under
    DeepSpeed ZeRO-3 each forward gathers parameters collectively and a rank with
    fewer calls would hang the others. With ZeRO-3, ``generate`` also gets
    ``synced_gpus=True`` so ranks keep stepping together until all sequences end.
    Completions are gathered with ``all_gather_object``; every rank returns all of them.
    """
    rank, world_size = _world()
    synced_gpus = world_size > 1 and zero3_enabled()
    share = rank_share(len(prompts), rank, world_size)
    dummy = prompts[0] if prompts else ""
    local_prompts = [prompts[i] if i is not None else dummy for i in share]

    local: list[tuple[int, str]] = []
    with _generation_mode(model, tokenizer), torch.no_grad():
        config = _greedy_config(model, tokenizer, max_new_tokens)
        batches = range(0, len(local_prompts), batch_size)
        for start in tqdm(batches, desc=desc, disable=not progress or rank != 0):
            completions = _generate_batch(
                model, tokenizer, local_prompts[start:start + batch_size], config,
                stopping=stopping, add_special_tokens=add_special_tokens, synced_gpus=synced_gpus,
            )
            local += [(i, c) for i, c in zip(share[start:start + batch_size], completions) if i is not None]

    ordered = [""] * len(prompts)
    for per_rank in _gather(local, world_size):
        for index, completion in per_rank:
            ordered[index] = completion
    return ordered
