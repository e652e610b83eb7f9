"""DuDeSFTTrainer is a drop-in SFTTrainer: identical without a DuDeConfig, DuDe with one."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from conftest import make_qwen2, make_tokenizer
from dude_trl import DuDeConfig, DuDeSFTTrainer
from dude_trl.variant import DuDeLinearVariant

DATA = Dataset.from_dict({"text": [f"Q: {i} plus {i + 3}? A: {2 * i + 3}." for i in range(48)]})


def _args(tmp_path, **kw) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=3,
    )
    return SFTConfig(**{**defaults, **kw})


def _losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize(
    "peft_config_factory",
    [lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), lambda: None],
    ids=["LoraConfig", "no_peft"],
)
def test_identical_to_sft_trainer_without_dude_config(tmp_path, peft_config_factory):
    runs = []
    for cls in (SFTTrainer, DuDeSFTTrainer):
        trainer = cls(
            model=make_qwen2(), args=_args(tmp_path / cls.__name__), train_dataset=DATA,
            processing_class=make_tokenizer(), peft_config=peft_config_factory(),
        )
        runs.append(_losses(trainer))
    assert len(runs[0]) == 4 and runs[0] == runs[1]


def test_dude_from_path_trains_and_saves_adapter(tmp_path, tiny_model_dir):
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], method="dude")
    trainer = DuDeSFTTrainer(
        model=tiny_model_dir, args=_args(tmp_path, max_steps=12, learning_rate=2e-2, save_strategy="steps", save_steps=6),
        train_dataset=DATA, peft_config=config,
    )
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_variant["default"], DuDeLinearVariant)
    assert "default" in layer.lora_dude_init_A
    losses = _losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    trainer.save_model()
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "dude"
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "checkpoint-12" / "trainer_state.json").exists()
    # Every checkpoint carries what rebuilds the residual exactly (initial factors, fingerprints).
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoint-12" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("q_proj.lora_dude_init_A") for k in keys)
    assert any(k.endswith("q_proj.lora_dude_base_fingerprint") for k in keys)
    # Gradient norms are logged by default, through the Trainer's own logging.
    rows = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"grad_norm/total", "grad_norm/magnitude", "grad_norm/lora_A", "grad_norm/lora_B"} <= h.keys() for h in rows)


def test_grad_norm_logging_can_be_turned_off_and_dtype_is_kept(tmp_path, tiny_model_dir):
    """`log_grad_norms=False` leaves the logs as SFTTrainer writes them; TRL's
    `model_init_kwargs` dtype still applies to a model given by path."""
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], method="dude")
    args = _args(tmp_path, max_steps=2, model_init_kwargs={"dtype": "bfloat16"}, bf16=True)
    trainer = DuDeSFTTrainer(model=tiny_model_dir, args=args, train_dataset=DATA, peft_config=config,
                             log_grad_norms=False)  # fmt: skip
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert len(_losses(trainer)) == 2
    assert not any(k.startswith("grad_norm/") for h in trainer.state.log_history for k in h)


@pytest.mark.parametrize("method", ["dude_a", "pissa", "dora"])
def test_gradient_checkpointing_trains(tmp_path, method):
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], method=method)
    trainer = DuDeSFTTrainer(
        model=make_qwen2(), args=_args(tmp_path, gradient_checkpointing=True, max_steps=2),
        train_dataset=DATA, processing_class=make_tokenizer(), peft_config=config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    losses = _losses(trainer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n or "magnitude" in n)


def test_dude_sft_config_carries_the_trainers_own_settings(tmp_path):
    """`DuDeSFTConfig` reaches grad-norm logging and the in-loop eval task, from the command line
    as from code: `--eval_task gsm8k` adds an evaluation logged as gsm8k/* at step 0 and at the end."""
    from trl import TrlParser

    from dude_trl import DuDeSFTConfig
    from dude_trl.synthetic import make_gsm8k_dataset

    eval_file = tmp_path / "dev.jsonl"
    make_gsm8k_dataset(3, seed=0, split="test").to_json(str(eval_file))
    (args,) = TrlParser((DuDeSFTConfig,)).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true",
        "--logging_steps", "1", "--log_grad_norms", "false", "--eval_task", "gsm8k",
        "--eval_task_dataset", str(eval_file), "--eval_task_steps", "2", "--eval_task_on_start", "true",
        "--eval_task_max_new_tokens", "4", "--eval_task_batch_size", "2",
    ])  # fmt: skip
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], method="dude")
    trainer = DuDeSFTTrainer(model=make_qwen2(), args=args, train_dataset=DATA, processing_class=make_tokenizer(),
                             peft_config=config)  # fmt: skip
    trainer.train()
    history = trainer.state.log_history
    evals = [h for h in history if "gsm8k/accuracy" in h]
    assert [h["step"] for h in evals] == [0, 2]
    assert all(h["gsm8k/num_samples"] == 3 and "gsm8k/accuracy_flexible" in h for h in evals)
    assert not any(k.startswith("grad_norm/") for h in history for k in h)
    assert (tmp_path / "run" / "gsm8k_samples_step0.jsonl").exists()


def test_dude_sft_config_refuses_unknown_task_and_bad_numbers(tmp_path):
    from dude_trl import DuDeSFTConfig

    with pytest.raises(ValueError, match="eval_task='mmlu' is not a known task.*gsm8k"):
        DuDeSFTConfig(output_dir=str(tmp_path), eval_task="mmlu")
    with pytest.raises(ValueError, match="eval_task_steps must be a positive integer"):
        DuDeSFTConfig(output_dir=str(tmp_path), eval_task="gsm8k", eval_task_steps=0)


def test_dude_sft_config_trains_in_float32_on_cpu_unless_bf16_is_asked(tmp_path):
    """TRL defaults to bf16 autocast; on a CPU without bf16 matmuls that is hundreds of times slower."""
    from dude_trl import DuDeSFTConfig

    assert SFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is True  # TRL's default, which this changes
    assert DuDeSFTConfig(output_dir=str(tmp_path), use_cpu=True).bf16 is False
    assert DuDeSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True).bf16 is True


def _gsm8k_file(path, n: int) -> str:
    path.write_text("".join(json.dumps({"question": f"What is {i} plus 2?", "answer": f"{i}+2 = {i + 2}\n#### {i + 2}"}) + "\n"
                            for i in range(n)))  # fmt: skip
    return str(path)


def test_eval_task_on_training_questions_is_refused_and_a_held_out_slice_trains(tmp_path):
    """An in-loop evaluation whose questions are in the training data is refused by name; the
    documented held-out slice of the same file (train on `train[:-k]`, evaluate `train[-k:]`) runs,
    evaluates at step 0 and writes every sample."""
    from dude_trl import DuDeSFTConfig
    from dude_trl.data import load_sft_dataset

    data_file = _gsm8k_file(tmp_path / "train.jsonl", 24)
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], method="dude")

    def trainer(train_split: str, eval_split: str | None) -> DuDeSFTTrainer:
        args = DuDeSFTConfig(
            output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to="none",
            use_cpu=True, save_strategy="no", disable_tqdm=True, log_grad_norms=False, eval_task="gsm8k",
            eval_task_dataset=data_file, eval_task_split=eval_split, eval_task_on_start=True,
            eval_task_max_new_tokens=4, eval_task_batch_size=4,
        )  # fmt: skip
        train = load_sft_dataset(data_file, split=train_split, conversational=False)
        return DuDeSFTTrainer(model=make_qwen2(), args=args, train_dataset=train, processing_class=make_tokenizer(),
                              peft_config=config)  # fmt: skip

    with pytest.raises(ValueError, match=r"24 of the 24 evaluation questions of gsm8k are also in the training data"):
        trainer("train", None)
    with pytest.raises(ValueError, match=r"6 of the 6 evaluation questions"):
        trainer("train", "train[-6:]")
    run = trainer("train[:-6]", "train[-6:]")
    run.train()
    evals = [h for h in run.state.log_history if "gsm8k/accuracy" in h]
    assert [h["step"] for h in evals] == [0, 1] and evals[0]["gsm8k/num_samples"] == 6
    samples = [json.loads(line) for line in (tmp_path / "run" / "gsm8k_samples_step0.jsonl").open()]
    assert [s["question"] for s in samples] == [f"What is {i} plus 2?" for i in range(18, 24)]
    assert all(s["prompt"].endswith(f"Question: {s['question']}\nAnswer:") for s in samples)
    assert {"answer", "prediction", "correct", "prediction_flexible", "correct_flexible"} <= samples[0].keys()
