"""Tiny offline causal LM, tokenizer, dataset and trainer factory for the grad-norm tests.

Everything is built locally (no hub): a 2-layer Llama with hidden size 32, a word-level
tokenizer and a dataset of fixed-length sentences, so that runs with different batch
layouts (accumulation, several processes) see exactly the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `WORDS` with pad/eos/unk tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_dataset(n: int = 32, words_per_text: int = 12, seed: int = 0) -> Dataset:
    """`n` distinct sentences of exactly `words_per_text` words (equal token length)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(WORDS), (n, words_per_text), generator=gen)
    texts = [" ".join(WORDS[i] for i in row) for row in ids.tolist()]
    return Dataset.from_dict({"text": texts})


def make_model(seed: int = 0, hidden: int = 32) -> PeftModel:
    """Tiny Llama with a DuDe adapter (SVD init, so every adapter gradient is non-zero)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    base = LlamaForCausalLM(config)
    from dude_trl import DuDeConfig, get_dude_model

    dude = DuDeConfig(method="dude", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_dude_model(base, dude, progress=False)


def make_args(output_dir: str, **overrides) -> SFTConfig:
    """SFTConfig for short, deterministic CPU runs in float32; `overrides` win."""
    kwargs = dict(
        output_dir=output_dir,
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        data_seed=0,
        max_length=32,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def make_trainer(output_dir: str, callbacks=None, dataset: Dataset | None = None, **overrides) -> SFTTrainer:
    """A plain `trl.SFTTrainer` on the tiny model; `overrides` go to `SFTConfig`."""
    model = make_model()
    args = make_args(output_dir, **overrides)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset if dataset is not None else make_dataset(),
        processing_class=make_tokenizer(),
        callbacks=callbacks,
    )


def write_deepspeed_config(path: str, stage: int) -> str:
    """Minimal ZeRO-`stage` config for CPU runs (gloo); batch sizes and clipping from the Trainer."""
    config = {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def run_and_dump(output_dir: str, out_json: str, **overrides) -> None:
    """Train the tiny model with a `GradNormCallback` and dump this rank's logged values."""
    from dude_trl.callbacks.grad_norm import GradNormCallback

    callback = GradNormCallback()
    trainer = make_trainer(output_dir, callbacks=[callback], **overrides)
    trainer.train()
    rows = [
        {k: v for k, v in row.items() if k.startswith("grad_norm") or k == "step"}
        for row in trainer.state.log_history
        if "loss" in row
    ]
    with open(out_json, "w") as f:
        json.dump(rows, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=0.01)
    cli = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    run_and_dump(
        cli.output_dir,
        os.path.join(cli.output_dir, f"rank{rank}.json"),
        deepspeed=cli.deepspeed,
        per_device_train_batch_size=cli.batch_size,
        gradient_accumulation_steps=cli.grad_accum,
        max_steps=cli.max_steps,
        max_grad_norm=cli.max_grad_norm,
    )
    # Tear the process group down before interpreter exit: letting gloo's and DeepSpeed's
    # communication threads die with the interpreter aborts a rank ("terminate called
    # without an active exception") after an otherwise successful run.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
