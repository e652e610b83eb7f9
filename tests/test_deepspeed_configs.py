"""The shipped DeepSpeed JSON configs and accelerate launcher YAMLs.

Static checks (parse, stage, offload, "auto" fields, no accelerate/DeepSpeed key clashes) plus real
CPU training runs: each JSON trains a tiny PEFT-DoRA model for two steps under ``trl.SFTTrainer`` in a
fresh process (DeepSpeed keeps global state), and the 2-process launcher YAML trains through
``accelerate launch``. Every run must end with an adapter-only checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DS_DIR = REPO / "deepspeed_configs"
ACCELERATE_DIR = DS_DIR / "accelerate"
EXPECTED = {
    "zero2.json": {"stage": 2, "offload": False},
    "zero3.json": {"stage": 3, "offload": False},
    "zero3_offload.json": {"stage": 3, "offload": True},
}
LAUNCHERS = {
    "zero2_8gpu.yaml": ("zero2.json", 1, 8),
    "zero3_8gpu.yaml": ("zero3.json", 1, 8),
    "zero3_offload_8gpu.yaml": ("zero3_offload.json", 1, 8),
    "zero3_multinode.yaml": ("zero3.json", 2, 16),
    "zero3_cpu_2proc.yaml": ("zero3.json", 1, 2),
}
# accelerate raises when these are set in the YAML next to `deepspeed_config_file`
# (DeepSpeedPlugin._deepspeed_config_checks); precision must come from the JSON.
FORBIDDEN_WITH_CONFIG_FILE = {
    "gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
    "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path", "zero3_save_16bit_model",
}

# Runs in a fresh interpreter: builds a tiny Qwen2 (q/k/v biases) + word-level tokenizer, trains a
# PEFT DoRA adapter for two steps with SFTTrainer, saves, and prints one RESULT line (rank 0).
WORKER = r'''
import json, os, random, sys
from pathlib import Path


def build_tiny(model_dir):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = "the a cat dog sat on mat ran to park 0 1 2 3 4 5 6 7 8 9 + = answer is".split()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    if int(os.environ.get("RANK", "0")) == 0:
        Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
        fast.save_pretrained(model_dir)
    return fast, words


def main(ds_config, out_dir):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    out = Path(out_dir)
    model_dir = out / "tiny_model"
    # SFTConfig first: with ZeRO-3 it makes from_pretrained partition the weights at load.
    args = SFTConfig(
        output_dir=str(out / "run"), deepspeed=None if ds_config == "from-accelerate" else ds_config,
        use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], max_length=32, disable_tqdm=True,
    )
    with args.main_process_first(desc="tiny model"):  # rank 0 writes the model, the others wait
        tok, words = build_tiny(model_dir)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(16)]
    peft_config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tok, peft_config=peft_config)
    trainer.train()
    save_dir = out / "final"
    trainer.save_model(str(save_dir))
    if not trainer.accelerator.is_main_process:
        return
    from safetensors import safe_open

    with safe_open(str(save_dir / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    engine = trainer.model_wrapped
    base_weight = trainer.model.get_base_model().model.layers[0].mlp.up_proj.weight
    print("RESULT " + json.dumps({
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "files": sorted(os.listdir(save_dir)),
        "shapes": shapes,
        "stage": engine.zero_optimization_stage(),
        "offload_optimizer": bool(engine.zero_cpu_offload()),
        "offload_param": bool(engine.zero_offload_param()),
        "partitioned_at_load": hasattr(base_weight, "ds_id"),
        "world_size": trainer.args.world_size,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DEEPSPEED_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", OMP_NUM_THREADS="1")
    return env


def _result(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _assert_adapter_only_training(result: dict) -> None:
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    files = set(result["files"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    # Real (gathered) tensors, not empty ZeRO-3 placeholders, and DoRA's magnitude is included.
    shapes = result["shapes"]
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == [4, 64]
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] == [32, 4]
    assert shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"] == [32]
    assert len(shapes) == 2 * 2 * 3


def _load(name: str) -> dict:
    return json.loads((DS_DIR / name).read_text())


# ------------------------------------------------------------------------------------------- static


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_json_parses_with_expected_stage_and_offload(name):
    cfg = _load(name)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == EXPECTED[name]["stage"]
    offloaded = "offload_optimizer" in zero or "offload_param" in zero
    assert offloaded == EXPECTED[name]["offload"]
    if EXPECTED[name]["offload"]:
        for key in ("offload_optimizer", "offload_param"):
            assert zero[key] == {"device": "cpu", "pin_memory": True}
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size"):
        assert cfg[key] == "auto", key
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == "auto"
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == "auto"
        assert zero["stage3_param_persistence_threshold"] == "auto"
        assert zero["stage3_gather_16bit_weights_on_model_save"] is False


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transformers_accepts_json(name):
    from transformers.integrations import HfDeepSpeedConfig

    ds = HfDeepSpeedConfig(str(DS_DIR / name))
    assert ds.get_value("zero_optimization.stage") == EXPECTED[name]["stage"]
    assert ds.is_zero3() == (EXPECTED[name]["stage"] == 3)
    assert ds.is_offload() == EXPECTED[name]["offload"]


def test_planner_sub_group_matches_zero3_json():
    from dude_trl.plan import ZERO3_SUB_GROUP_SIZE

    for name in ("zero3.json", "zero3_offload.json"):
        assert _load(name)["zero_optimization"]["sub_group_size"] == ZERO3_SUB_GROUP_SIZE


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_accelerate_yaml_points_at_json_without_clashing_keys(name):
    from accelerate.commands.config.config_args import load_config_from_file

    json_name, machines, processes = LAUNCHERS[name]
    cfg = load_config_from_file(str(ACCELERATE_DIR / name))
    assert str(cfg.distributed_type) in ("DEEPSPEED", "DistributedType.DEEPSPEED")
    assert cfg.deepspeed_config["deepspeed_config_file"] == f"deepspeed_configs/{json_name}"
    assert (REPO / cfg.deepspeed_config["deepspeed_config_file"]).is_file()
    assert cfg.num_machines == machines and cfg.num_processes == processes
    assert cfg.mixed_precision is None, "accelerate rejects mixed_precision next to deepspeed_config_file"
    assert not FORBIDDEN_WITH_CONFIG_FILE & set(cfg.deepspeed_config)
    assert cfg.deepspeed_config["zero3_init_flag"] == (_load(json_name)["zero_optimization"]["stage"] == 3)


def test_multinode_yaml_builds_torchrun_rendezvous(monkeypatch):
    """Resolve the multi-node YAML the way `accelerate launch` does, without starting anything."""
    import accelerate.utils.launch as launch_utils
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    monkeypatch.setattr(launch_utils, "is_port_in_use", lambda port: False)
    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE_DIR / "zero3_multinode.yaml"), "--machine_rank", "1", "train.py"]
    )
    args, defaults, mp_from_config = _validate_launch_command(args)
    assert args.use_deepspeed and not mp_from_config
    # as accelerate.commands.launch.launch_command does before calling deepspeed_launcher
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = launch_utils.prepare_deepspeed_cmd_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "10.0.0.1:29500" and args.rdzv_backend == "static"
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "deepspeed_configs/zero3.json"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # precision comes from the JSON's "auto"
    fields = set(env["ACCELERATE_CONFIG_DS_FIELDS"].split(","))
    assert not fields & (FORBIDDEN_WITH_CONFIG_FILE | {"mixed_precision"})


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "name, offload",
    [("zero2.json", False), ("zero3.json", False), ("zero3_offload.json", True)],
)
def test_json_trains_on_cpu_and_saves_adapter_only(tmp_path, name, offload):
    """Single process: DeepSpeed needs the torch.distributed env vars even for world size 1."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _clean_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    proc = subprocess.run([sys.executable, str(script), str(DS_DIR / name), str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    result = _result(proc)
    _assert_adapter_only_training(result)
    assert result["stage"] == EXPECTED[name]["stage"]
    assert result["offload_optimizer"] == offload and result["offload_param"] == offload
    assert result["partitioned_at_load"] == (EXPECTED[name]["stage"] == 3)


@pytest.mark.slow
@pytest.mark.multiproc
def test_cpu_launcher_yaml_trains_two_processes(tmp_path):
    """`accelerate launch` with the CPU YAML: the JSON comes from the YAML, not from SFTConfig."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    proc = subprocess.run(
        [*launcher, "--config_file", str(ACCELERATE_DIR / "zero3_cpu_2proc.yaml"),
         str(script), "from-accelerate", str(tmp_path / "out")],
        cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=900,
    )
    result = _result(proc)
    _assert_adapter_only_training(result)
    assert result["world_size"] == 2 and result["stage"] == 3 and result["partitioned_at_load"]
