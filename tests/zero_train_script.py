"""Train a tiny DuDe model under DeepSpeed ZeRO-2/3 or plain DDP; launched by tests/test_zero.py.

Run with ``torchrun --nproc_per_node N tests/zero_train_script.py --model-dir D --out-dir O
--job NAME:CONFIG:SVD [--job ...]``. The model is handed to `DuDeSFTTrainer` as a path, so under
ZeRO-3 `from_pretrained` partitions it at load, as for a 32B model. For each job the script
builds a trainer, snapshots what this process holds right after the DuDe initialisation
(gathered residual, A, B, magnitude, init buffers), trains, and saves the adapter with
`trainer.save_model`. It writes, under ``O/NAME/``:

- ``rank<k>.json``: micro-batches this process trained on, layers whose SVD it computed, init
  time, the largest number of base-weight elements the init gathered at once, losses, and how far
  the trained model with its adapter disabled is from the pretrained model (max |logit diff|);
- ``init_rank<k>.safetensors``: the post-init snapshot;
- ``adapter/``: what `save_model` wrote (rank 0), ``trainer/``: Trainer checkpoints if any;
- with ``--resume-job NAME``: a checkpoint at step ``steps - 1``, then ``adapter_resumed/`` from a
  fresh trainer resumed from it, and ``resumed_rank<k>.json``.

The global batch is fixed (``--global-batch``) and split over processes; every sample has the
same token length, so per-process mean losses average to the single-process loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import string
import sys
import time
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from datasets import Dataset
from peft.utils.integrations import gather_params_ctx
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from trl import SFTConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_qwen2, make_tokenizer  # noqa: E402

import dude_trl.distributed  # noqa: E402
import dude_trl.layer_init  # noqa: E402
from dude_trl import DuDeConfig, DuDeSFTTrainer  # noqa: E402
from dude_trl.layers import INIT_A, INIT_B  # noqa: E402

TEXT_LENGTH = 24
NUM_SAMPLES = 32
TARGET_MODULES = ["q_proj", "v_proj", "down_proj"]
PROBE_IDS = torch.tensor([[5, 17, 42, 8, 66, 23, 9, 31], [12, 3, 77, 45, 60, 14, 29, 50]])


def make_dataset() -> Dataset:
    """Distinct random strings of `TEXT_LENGTH` characters (one token each)."""
    rng = random.Random(0)
    alphabet = string.ascii_lowercase + " "
    texts = ["".join(rng.choice(alphabet) for _ in range(TEXT_LENGTH)) for _ in range(NUM_SAMPLES)]
    return Dataset.from_dict({"text": texts})


def save_tiny_model(path: str) -> None:
    """The tiny Qwen2 (biases on q/k/v) and its tokenizer, loadable by path."""
    make_qwen2().save_pretrained(path)
    make_tokenizer().save_pretrained(path)


class InitReports(logging.Handler):
    """Collects the `SVDInitReport`s that `dude_trl.distributed` attaches to its log records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reports: list[Any] = []

    def emit(self, record: logging.LogRecord) -> None:
        report = getattr(record, "dude_init_report", None)
        if report is not None:
            self.reports.append(report)


class GatherMeter:
    """Largest number of ZeRO-3 parameter elements the DuDe init gathers in one context."""

    def __init__(self) -> None:
        self.max_numel = 0

    def wrap(self, gather: Callable) -> Callable:
        def metered(params, *args, **kwargs):
            params = list(params)
            self.max_numel = max(self.max_numel, sum(getattr(p, "ds_numel", 0) for p in params))
            return gather(params, *args, **kwargs)

        return metered


class RecordingTrainer(DuDeSFTTrainer):
    """Remembers the input ids of every micro-batch this process trained on."""

    seen_batches: list

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen_batches.append(inputs["input_ids"].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


def snapshot_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) residual, A, B, magnitude and init buffers of every adapted layer."""
    state = {}
    for name, module in model.named_modules():
        if not hasattr(module, INIT_A):
            continue
        tensors = {
            "residual": module.get_base_layer().weight,
            "lora_A": module.lora_A["default"].weight,
            "lora_B": module.lora_B["default"].weight,
        }
        if "default" in module.lora_magnitude_vector:
            tensors["magnitude"] = module.lora_magnitude_vector["default"].weight
        with gather_params_ctx(list(tensors.values()), modifier_rank=None):
            for key, tensor in tensors.items():
                state[f"{name}.{key}"] = tensor.detach().float().cpu().clone()
        for attr in (INIT_A, INIT_B):
            state[f"{name}.{attr}"] = getattr(module, attr)["default"].detach().float().cpu().clone()
    return state


def parse_job(spec: str) -> tuple[str, Optional[str], Optional[int]]:
    """``NAME:CONFIG:SVD`` -> (name, DeepSpeed config path or None for 'none', svd_niter)."""
    name, config, svd = spec.split(":")
    return name, None if config == "none" else config, None if svd == "exact" else int(svd)


def make_args(
    output_dir: str, deepspeed: Optional[str], cli: argparse.Namespace, world_size: int, **overrides: Any
) -> SFTConfig:
    """fp32, constant learning rate, no dropout: runs differ only in how the work is distributed."""
    kwargs = dict(
        output_dir=output_dir,
        deepspeed=deepspeed,
        use_cpu=True,
        max_steps=cli.steps,
        per_device_train_batch_size=cli.global_batch // world_size,
        gradient_accumulation_steps=1,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        seed=0,
        data_seed=0,
        bf16=False,
        fp16=False,
        max_length=64,
        packing=False,
        dataset_text_field="text",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def build_trainer(cli: argparse.Namespace, args: SFTConfig, svd_niter: Optional[int]) -> RecordingTrainer:
    if args.deepspeed:
        # On CPU (`use_cpu`) accelerate starts torch.distributed but not DeepSpeed's comm layer, so
        # zero.Init (run by from_pretrained before the Trainer exists) would size the batch for one
        # process. Launches on GPUs initialise it already; this is a no-op there.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    peft_config = DuDeConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, method=cli.method, svd_niter=svd_niter,
        target_modules=TARGET_MODULES, task_type="CAUSAL_LM",
    )
    trainer = RecordingTrainer(
        model=cli.model_dir, args=args, train_dataset=make_dataset(),
        processing_class=make_tokenizer(), peft_config=peft_config,
    )
    trainer.seen_batches = []
    return trainer


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits on `PROBE_IDS` (every process must call it under ZeRO-3: the forward gathers)."""
    with torch.no_grad():
        return model(input_ids=PROBE_IDS).logits.float().cpu()


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument(
        "--job", action="append", required=True,
        help="NAME:CONFIG:SVD; CONFIG a DeepSpeed config or 'none' (DDP), SVD 'exact' or a power-iteration count",
    )
    parser.add_argument("--method", default="dude")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume-job", default=None,
                        help="for this job, also checkpoint at step `steps - 1` and resume from it in a fresh trainer")
    cli = parser.parse_args()

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cli.global_batch % world_size:
        raise ValueError(f"--global-batch {cli.global_batch} must be divisible by the {world_size} processes.")
    reports = InitReports()
    dist_logger = logging.getLogger("dude_trl.distributed")
    dist_logger.addHandler(reports)
    dist_logger.setLevel(logging.DEBUG)
    # Before any SFTConfig exists, so that ZeRO-3 does not partition this copy at load.
    pretrained_logits = probe_logits(AutoModelForCausalLM.from_pretrained(cli.model_dir, dtype=torch.float32).eval())
    meter = GatherMeter()
    dude_trl.distributed.gather_params_ctx = meter.wrap(dude_trl.distributed.gather_params_ctx)
    dude_trl.layer_init.gather_params_ctx = meter.wrap(dude_trl.layer_init.gather_params_ctx)

    for name, deepspeed_config, svd_niter in map(parse_job, cli.job):
        job_dir = os.path.join(cli.out_dir, name)
        os.makedirs(job_dir, exist_ok=True)
        checkpointing = name == cli.resume_job
        overrides = dict(save_strategy="steps", save_steps=cli.steps - 1) if checkpointing else {}
        args = make_args(os.path.join(job_dir, "trainer"), deepspeed_config, cli, world_size, **overrides)
        meter.max_numel = 0
        start = time.perf_counter()
        trainer = build_trainer(cli, args, svd_niter)
        build_seconds = time.perf_counter() - start
        save_file(snapshot_adapter_state(trainer.model), os.path.join(job_dir, f"init_rank{rank}.safetensors"))
        max_gather = meter.max_numel
        trainer.train()
        with trainer.model.disable_adapter():
            disabled_diff = (probe_logits(trainer.model) - pretrained_logits).abs().max().item()
        trainer.save_model(os.path.join(job_dir, "adapter"))
        report = reports.reports[-1]
        write_json(
            os.path.join(job_dir, f"rank{rank}.json"),
            {
                "rank": rank,
                "world_size": world_size,
                "batches": trainer.seen_batches,
                "decomposed": list(report.decomposed),
                "init_world_size": report.world_size,
                "init_seconds": report.seconds,
                "build_seconds": build_seconds,
                "max_init_gather_numel": max_gather,
                "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
                "disabled_adapter_max_logit_diff": disabled_diff,
            },
        )
        del trainer
        if checkpointing:
            # A fresh trainer redoes the deterministic SVD init from the base, then loads the
            # checkpointed adapter and optimizer state and trains the remaining step.
            checkpoint = os.path.join(job_dir, "trainer", f"checkpoint-{cli.steps - 1}")
            args = make_args(os.path.join(job_dir, "resumed"), deepspeed_config, cli, world_size)
            trainer = build_trainer(cli, args, svd_niter)
            trainer.train(resume_from_checkpoint=checkpoint)
            trainer.save_model(os.path.join(job_dir, "adapter_resumed"))
            write_json(os.path.join(job_dir, f"resumed_rank{rank}.json"), {"batches": trainer.seen_batches})
            del trainer
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
