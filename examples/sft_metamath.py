"""Fine-tune a causal LM on MetaMathQA-style data with DuDe (or a baseline), GSM8K in the loop.

Offline demo (SmolLM2-135M-Instruct from `scripts/fetch_smollm2.py`, the synthetic curriculum):

    accelerate launch --config_file examples/configs/accelerate_one_process.yaml examples/sft_metamath.py \
        --config examples/configs/demo_offline.yaml

The paper's setting (rank 16, lr 2e-5, cosine, warmup 0.03, W_q/W_v) on 8 GPUs with ZeRO-3:

    accelerate launch --config_file deepspeed_configs/accelerate/zero3_8gpu.yaml \\
        examples/sft_metamath.py --config examples/configs/paper_qwen2.5_32b.yaml

Every `SFTConfig` flag, TRL's `ModelConfig` flags (`--model_name_or_path`, `--lora_r`,
`--lora_alpha`, `--lora_target_modules`, `--load_in_4bit`, ...) and TRL's `ScriptArguments`
(`--dataset_name meta-math/MetaMathQA`) work as in TRL's own `sft.py`. `DuDeSFTConfig` adds the
trainer's own flags (`--eval_task gsm8k --eval_task_num_samples N --eval_task_dataset FILE_OR_HUB_ID`,
`--log_grad_norms`), and `DuDeArguments` below the DuDe method. Without `--config`, the offline
demo config is used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_quantization_config

from dude_trl import DuDeConfig, DuDeSFTConfig, DuDeSFTTrainer
from dude_trl.data import load_sft_dataset
from dude_trl.plot import plot_runs

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo_offline.yaml"


@dataclass
class DuDeArguments:
    """What this script adds to TRL's arguments."""

    method: str = field(default="dude", metadata={"help": "dude | dude_a | dude_b | lora | dora | pissa"})
    svd_niter: Optional[int] = field(default=None, metadata={"help": "None: exact SVD; k: randomized SVD, k iters"})
    quant_iters: int = field(default=0, metadata={"help": "refinement rounds on a 4/8-bit base"})
    num_train_samples: Optional[int] = field(default=None, metadata={"help": "cap on training samples"})
    plot: bool = field(default=True, metadata={"help": "write curves.png into output_dir at the end"})


def build_peft_config(model_args: ModelConfig, dude_args: DuDeArguments) -> DuDeConfig:
    return DuDeConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or ["q_proj", "v_proj"],
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        task_type=model_args.lora_task_type,
        method=dude_args.method,
        svd_niter=dude_args.svd_niter,
        quant_iters=dude_args.quant_iters,
    )


def main(
    script_args: ScriptArguments, training_args: DuDeSFTConfig, model_args: ModelConfig, dude_args: DuDeArguments
) -> None:
    if model_args.model_name_or_path is None:
        raise ValueError("Pass --model_name_or_path (or a --config that sets it).")
    training_args.model_init_kwargs = {
        "dtype": model_args.dtype or "float32",
        "revision": model_args.model_revision,
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    }
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    train_dataset = load_sft_dataset(
        script_args.dataset_name,
        split=script_args.dataset_train_split,
        num_samples=dude_args.num_train_samples,
        seed=training_args.seed,
        config_name=script_args.dataset_config,
        # Base models without a chat template (Llama-2, Mistral-7B) train on plain Question/Answer text.
        conversational=tokenizer.chat_template is not None,
    )
    trainer = DuDeSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=build_peft_config(model_args, dude_args),
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(Path(training_args.output_dir) / "trainer_state.json"))
        if dude_args.plot:
            out = plot_runs([training_args.output_dir], Path(training_args.output_dir) / "curves.png")
            print(f"Curves written to {out}")
    # Shut the process group down explicitly: leaving gloo/NCCL threads to die with the
    # interpreter can abort a rank after a successful multi-process run.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def parse_args(argv: list[str]) -> tuple:
    parser = TrlParser((ScriptArguments, DuDeSFTConfig, ModelConfig, DuDeArguments))
    if "--config" not in argv:
        argv = ["--config", str(DEMO_CONFIG), *argv]
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    main(*parse_args(sys.argv[1:]))
