"""The memory planner: exact counts against real models, ZeRO scaling, DeepSpeed agreement, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dude_trl.plan import (
    GIB,
    PlanError,
    PlanRequest,
    available_linear_suffixes,
    compare_with_deepspeed,
    deepspeed_model_states,
    inspect_model,
    load_model_config,
    plan_memory,
)
from dude_trl.plan.__main__ import main

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Published parameter counts of the models whose configs ship in dude_trl/model_configs.
PUBLISHED_PARAMS = {
    "qwen1.5-7b": 7_721_324_544,
    "llama2-13b": 13_015_864_320,
    "mistral-7b-v0.1": 7_241_732_096,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
}


def _tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaConfig(**{**kwargs, **overrides})


def _tiny_qwen2_config(**overrides):
    from transformers import Qwen2Config

    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2Config(**{**kwargs, **overrides})


def _real_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def qwen32b():
    return inspect_model(load_model_config("qwen2.5-32b"))


@pytest.fixture
def tiny_dirs(tmp_path):
    dirs = {}
    for name, config in {
        "llama": _tiny_llama_config(),
        "llama_tied": _tiny_llama_config(tie_word_embeddings=True),
        "qwen2": _tiny_qwen2_config(),
    }.items():
        config.save_pretrained(tmp_path / name)
        dirs[name] = (tmp_path / name, config)
    return dirs


# --------------------------------------------------------------------------------- exact counts


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2"])
def test_total_params_equal_real_model(tiny_dirs, name):
    model_dir, config = tiny_dirs[name]
    expected = sum(p.numel() for p in _real_model(config).parameters())
    assert plan_memory(str(model_dir), PlanRequest()).total_params == expected
    assert plan_memory(str(model_dir / "config.json"), PlanRequest()).total_params == expected


def test_qwen2_counts_attention_biases(tiny_dirs):
    inv = inspect_model(load_model_config(str(tiny_dirs["qwen2"][0])))
    model = _real_model(tiny_dirs["qwen2"][1])
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    without_bias = sum(p.numel() for n, p in model.named_parameters() if not n.endswith("bias"))
    assert inv.total_params > without_bias


@pytest.mark.parametrize("name, targets", [
    ("llama", ["q_proj", "v_proj"]),
    ("qwen2", ["q_proj", "v_proj"]),
    ("qwen2", ["k_proj", "gate_proj", "down_proj"]),
    ("qwen2", "all-linear"),
])
@pytest.mark.parametrize("use_dora", [True, False])
def test_trainable_params_equal_peft(tiny_dirs, name, targets, use_dora):
    from peft import LoraConfig, get_peft_model

    model_dir, config = tiny_dirs[name]
    peft_model = get_peft_model(_real_model(config), LoraConfig(r=8, use_dora=use_dora, target_modules=targets))
    expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    target_arg = ("all-linear",) if targets == "all-linear" else tuple(targets)
    for method in (("dude", "dude_a", "dude_b", "dora") if use_dora else ("lora", "pissa")):
        plan = plan_memory(str(model_dir), PlanRequest(r=8, target_modules=target_arg, method=method))
        assert plan.trainable_params == expected, method


def test_bundled_configs_reproduce_published_param_counts():
    for name, count in PUBLISHED_PARAMS.items():
        assert inspect_model(load_model_config(name)).total_params == count, name


def test_hub_id_resolves_offline_to_bundled_config():
    assert load_model_config("Qwen/Qwen2.5-32B").to_dict() == load_model_config("qwen2.5-32b").to_dict()
    assert load_model_config("meta-llama/Llama-2-13b-hf").num_hidden_layers == 40
    with pytest.raises(PlanError, match="cannot resolve"):
        load_model_config("no-such-org/no-such-model-xyz")


def test_4bit_weights_equal_real_bitsandbytes_storage(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _real_model(_tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=quant, dtype=torch.bfloat16)
    stored = 0
    for p in model.parameters():
        stored += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:  # absmax per 64-block (uint8) + its fp32 absmax per 256 blocks
            stored += state.absmax.numel() * state.absmax.element_size()
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    plan = plan_memory(str(tmp_path / "m"), PlanRequest(zero_stage=0, load_in_4bit=True))
    assert plan.gpu["frozen_weights"] == stored


# ------------------------------------------------------------------------------------ accounting


def test_zero3_weights_fall_with_gpu_count(qwen32b):
    one = plan_memory("qwen2.5-32b", PlanRequest(num_gpus=1, zero_stage=3), qwen32b)
    for n in (2, 8, 16):
        many = plan_memory("qwen2.5-32b", PlanRequest(num_gpus=n, zero_stage=3), qwen32b)
        ratio = many.gpu["frozen_weights"] / one.gpu["frozen_weights"]
        assert 1 / n <= ratio < 1 / n * 1.01  # only tiny persistent params (norms, biases) stay replicated
    zero2 = plan_memory("qwen2.5-32b", PlanRequest(num_gpus=8, zero_stage=2), qwen32b)
    assert zero2.gpu["frozen_weights"] == one.gpu["frozen_weights"]


def test_offload_moves_states_to_cpu(qwen32b):
    plan = plan_memory("qwen2.5-32b", PlanRequest(num_gpus=8, zero_stage=3, offload=True), qwen32b)
    assert plan.gpu["optimizer_states"] == 0
    assert plan.cpu["frozen_weights"] == pytest.approx(2 * qwen32b.total_params, rel=0.01)  # whole node
    assert plan.cpu["optimizer_states"] == pytest.approx(12 * plan.trainable_params, rel=1e-6)
    assert plan.gpu["frozen_weights"] < 0.01 * GIB


def test_32b_needs_zero3_on_8_gpus(qwen32b):
    small = PlanRequest(num_gpus=1, gpu_memory_gb=24)
    assert not plan_memory("qwen2.5-32b", replace(small, zero_stage=0), qwen32b).fits
    assert not plan_memory("qwen2.5-32b", replace(small, zero_stage=3), qwen32b).fits
    assert not plan_memory("qwen2.5-32b", replace(small, zero_stage=0, gpu_memory_gb=16, load_in_4bit=True), qwen32b).fits
    big = plan_memory("qwen2.5-32b", PlanRequest(r=16, num_gpus=8, zero_stage=3, gpu_memory_gb=80), qwen32b)
    assert big.fits and big.per_gpu_bytes < 20 * GIB


def test_magnitude_and_initial_factor_costs(qwen32b):
    """Per q/v target DuDe keeps one bf16 tokens x out tensor more than LoRA (without
    checkpointing), and every GPU holds the bf16 initial factors A0, B0 (r*(in+out))."""
    base = PlanRequest(r=16, num_gpus=8, zero_stage=3, seq_len=512, micro_batch=1, gradient_checkpointing=False)
    lora = plan_memory("qwen2.5-32b", replace(base, method="lora"), qwen32b)
    dude = plan_memory("qwen2.5-32b", replace(base, method="dude"), qwen32b)
    per_layer_out = 5120 + 1024  # q_proj and v_proj outputs in each of the 64 layers
    assert dude.gpu["activations"] - lora.gpu["activations"] == pytest.approx(2 * 512 * 64 * per_layer_out, rel=1e-6)
    assert "init_factors" not in lora.gpu
    assert dude.gpu["init_factors"] == 2 * 64 * 16 * ((5120 + 5120) + (5120 + 1024))


def test_activations_follow_checkpointing_and_batch(qwen32b):
    base = PlanRequest(num_gpus=8, seq_len=1024, micro_batch=1)
    act = lambda req: plan_memory("qwen2.5-32b", req, qwen32b).gpu["activations"]  # noqa: E731
    assert act(replace(base, gradient_checkpointing=False)) > 20 * act(base)
    assert act(replace(base, micro_batch=4)) == pytest.approx(4 * act(base), rel=1e-6)
    assert act(replace(base, attn_implementation="eager")) > act(base)
    logits = plan_memory("qwen2.5-32b", base, qwen32b).gpu["logits"]
    assert logits == 1024 * (6 * 5120 + 10 * 152064)


# ------------------------------------------------------------------------------- DeepSpeed match


@pytest.mark.parametrize("num_gpus", [1, 4, 8, 16])
def test_full_finetune_matches_deepspeed_zero2(qwen32b, num_gpus):
    for offload in (False, True):
        req = PlanRequest(num_gpus=num_gpus, zero_stage=2, offload=offload)
        cmp = compare_with_deepspeed("qwen2.5-32b", req, qwen32b)
        assert cmp["gpu_ratio"] == pytest.approx(1.0, abs=0.01)
        if offload and num_gpus <= 4:  # beyond 4 GPUs DeepSpeed adds a per-process fp32 load copy
            assert cmp["planner_cpu_bytes_per_node"] == pytest.approx(cmp["cpu_bytes_per_node"], rel=0.01)


@pytest.mark.parametrize("num_gpus", [1, 8, 16])
def test_full_finetune_matches_deepspeed_zero3_offload(qwen32b, num_gpus):
    cmp = compare_with_deepspeed("qwen2.5-32b", PlanRequest(num_gpus=num_gpus, zero_stage=3, offload=True), qwen32b)
    assert cmp["gpu_ratio"] == pytest.approx(1.0, abs=0.01)
    assert cmp["planner_cpu_bytes_per_node"] == pytest.approx(cmp["cpu_bytes_per_node"], rel=0.01)


@pytest.mark.parametrize("model, num_gpus", [("qwen2.5-32b", 8), ("qwen2.5-32b", 16), ("llama2-13b", 8),
                                             ("qwen1.5-7b", 4)])
def test_full_finetune_zero3_agrees_with_deepspeed_up_to_documented_terms(model, num_gpus):
    """DeepSpeed counts 18 B/param; the planner 2+2+4+8 B plus the fp32 grad of one sub-group."""
    inv = inspect_model(load_model_config(model))
    cmp = compare_with_deepspeed(model, PlanRequest(num_gpus=num_gpus, zero_stage=3), inv)
    shard = inv.total_params / num_gpus
    swapped = cmp["gpu_bytes"] - 18 * shard + 16 * shard + 4 * min(shard, 1e9)
    assert cmp["planner_gpu_bytes"] == pytest.approx(swapped, rel=0.01)
    assert cmp["gpu_ratio"] == pytest.approx(1.0, abs=0.12)


def test_deepspeed_estimators_only_for_zero2_and_zero3(qwen32b):
    with pytest.raises(PlanError, match="ZeRO-2 and ZeRO-3"):
        deepspeed_model_states(qwen32b, PlanRequest(zero_stage=1))


# ----------------------------------------------------------------------------------------- errors


def test_rank_above_min_dim_is_rejected(tiny_dirs):
    model_dir, _ = tiny_dirs["qwen2"]  # k_proj/v_proj are 32 x 64
    with pytest.raises(PlanError, match=r"r=33 exceeds min\(in, out\)=32 of .*k_proj"):
        plan_memory(str(model_dir), PlanRequest(r=33, target_modules=("q_proj", "k_proj")))
    assert plan_memory(str(model_dir), PlanRequest(r=32, target_modules=("k_proj",))).trainable_params > 0


def test_unknown_targets_name_available_suffixes(tiny_dirs):
    model_dir, _ = tiny_dirs["llama"]
    with pytest.raises(PlanError) as err:
        plan_memory(str(model_dir), PlanRequest(target_modules=("query", "value")))
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert suffix in str(err.value)
    inv = inspect_model(load_model_config(str(model_dir)))
    assert available_linear_suffixes(inv)[:3] == ["q_proj", "k_proj", "v_proj"]


def test_bad_topology_and_flags_are_rejected(tiny_dirs):
    model_dir, _ = tiny_dirs["llama"]
    for bad in (PlanRequest(num_gpus=12, gpus_per_node=8), PlanRequest(zero_stage=0, offload=True),
                PlanRequest(full_finetune=True, load_in_4bit=True)):
        with pytest.raises(PlanError):
            plan_memory(str(model_dir), bad)


# -------------------------------------------------------------------------------------------- CLI


def test_cli_json_last_line(tiny_dirs, capsys):
    model_dir, _ = tiny_dirs["qwen2"]
    assert main([str(model_dir), "--r", "4", "--num-gpus", "2", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("total_params", "trainable_params", "per_gpu_bytes", "fits", "breakdown", "cpu_breakdown"):
        assert key in payload
    assert payload["per_gpu_bytes"] == sum(payload["breakdown"].values())
    assert {"frozen_weights", "adapter_weights", "gradients", "optimizer_states", "activations"} <= set(payload["breakdown"])


def test_cli_reports_errors_with_exit_code(tiny_dirs, capsys):
    model_dir, _ = tiny_dirs["llama"]
    assert main([str(model_dir), "--target-modules", "nope"]) == 2
    assert "available Linear module suffixes" in capsys.readouterr().err


def test_cli_subprocess_short_name():
    cmd = [sys.executable, "-m", "dude_trl.plan", "qwen2.5-32b", "--r", "16", "--target-modules", "q_proj,v_proj",
           "--num-gpus", "8", "--zero-stage", "3", "--gpu-memory-gb", "80", "--seq-len", "1024", "--micro-batch", "1",
           "--compare-deepspeed", "--json"]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    assert payload["total_params"] == PUBLISHED_PARAMS["qwen2.5-32b"]
    assert payload["trainable_params"] == 64 * (16 * (5120 + 5120) + 5120 + 16 * (5120 + 1024) + 1024)
    assert payload["fits"] is True
    assert payload["deepspeed"]["estimator"] == "estimate_zero3_model_states_mem_needs"


def test_cli_human_table(capsys):
    assert main(["qwen2.5-32b", "--num-gpus", "8", "--compare-deepspeed"]) == 0
    out = capsys.readouterr().out
    assert "FITS in 80 GiB per GPU" in out and "frozen_weights" in out and "total" in out
    assert "DeepSpeed estimate_zero3_model_states_mem_needs" in out


def test_cli_summary_for_several_models(capsys):
    assert main(["qwen1.5-7b", "mistral-7b-v0.1", "--num-gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "qwen1.5-7b" in out and "mistral-7b-v0.1" in out and "GiB/GPU" in out


# ------------------------------------------------------------------- the CLI never silently wrong


@pytest.mark.parametrize("flag, value, expected", [
    ("--gpu-memory-gb", "0", "must be a finite number > 0"),
    ("--gpu-memory-gb", "-80", "must be a finite number > 0"),
    ("--gpu-memory-gb", "nan", "must be a finite number > 0, got 'nan'"),
    ("--gpu-memory-gb", "inf", "must be a finite number > 0, got 'inf'"),
    ("--gpu-memory-gb", "-inf", "must be a finite number > 0"),
    ("--gpu-memory-gb", "lots", "expected a finite number > 0, got 'lots'"),
    ("--gpus-per-node", "0", "must be an integer >= 1, got 0"),
    ("--gpus-per-node", "-8", "must be an integer >= 1, got -8"),
    ("--num-gpus", "0", "must be an integer >= 1, got 0"),
    ("--r", "0", "must be an integer >= 1, got 0"),
    ("--seq-len", "0", "must be an integer >= 1, got 0"),
    ("--micro-batch", "-1", "must be an integer >= 1, got -1"),
    ("--micro-batch", "1.5", "expected an integer >= 1, got '1.5'"),
])
def test_cli_refuses_out_of_range_numbers(capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["qwen2.5-32b", f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {expected}" in err and "Traceback" not in err


def _write(text):
    return lambda path: path.write_text(text)


def _llama_json(**overrides):
    values = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, **overrides}
    return json.dumps({k: v for k, v in values.items() if v is not None})


@pytest.mark.parametrize("make, message", [
    (None, r"config\.json: no such file or directory"),
    (_write('{"model_type": "llama", "hidden'), r"cannot read .*config\.json as a model config: Unterminated"),
    (_write("\xff\xfe not text"), r"cannot read .*config\.json as a model config"),
    (_write("[1, 2]"), r"holds a JSON list, not an object of model settings"),
    (_write('{"hidden_size": 64}'), r"has no 'model_type'"),
    (_write('{"model_type": "no-such-architecture"}'), r"model_type 'no-such-architecture' is not one this"),
    (_write(_llama_json(hidden_size=None, num_attention_heads=None)),
     r"has no hidden_size, num_attention_heads: the plan would use the LlamaConfig defaults"),
    (_write(_llama_json(num_hidden_layers=0)), r"num_hidden_layers must be a positive integer, got 0"),
    (_write(_llama_json(hidden_size="wide")), r"hidden_size.*expected int, got str|hidden_size must be a positive"),
    (_write(_llama_json(num_attention_heads=5)), r"not a multiple of the number of attention heads"),
])
def test_cli_refuses_unreadable_or_incomplete_config(tmp_path, capsys, make, message):
    path = tmp_path / "config.json"
    if make is not None:
        make(path)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert "Traceback" not in err


def test_cli_accepts_a_config_naming_fields_by_alias(tmp_path, capsys):
    """GPT-2 stores hidden_size as n_embd (its attribute_map): present, not missing."""
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 300, "n_embd": 64, "n_layer": 2, "n_head": 4}))
    assert main([str(tmp_path), "--target-modules", "all-linear"]) == 0
    assert "FITS" in capsys.readouterr().out


def test_cli_refuses_a_directory_without_config(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "is a directory without config.json" in capsys.readouterr().err


def test_cli_process_reports_a_broken_config_without_traceback(tmp_path):
    (tmp_path / "config.json").write_text("not json")
    out = subprocess.run([sys.executable, "-m", "dude_trl.plan", str(tmp_path / "config.json")], cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: cannot read" in out.stderr


def test_cli_check_exit_status_follows_the_verdict(tiny_dirs, capsys):
    model_dir = str(tiny_dirs["qwen2"][0])
    assert main([model_dir, "--check"]) == 0
    assert "FITS in 80 GiB" in capsys.readouterr().out
    assert main([model_dir, "--gpu-memory-gb", "0.01", "--check"]) == 1
    assert "DOES NOT FIT in 0.01 GiB" in capsys.readouterr().out
    assert main([model_dir, "--gpu-memory-gb", "0.01"]) == 0  # without --check: today's behaviour
    assert main([model_dir, "--gpu-memory-gb", "0.01", "--check", "--json"]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"] is False
    # Several models: 1 when any of them does not fit (about 2.006 and 2.018 GiB per GPU).
    bigger = str(tiny_dirs["llama"][0])
    assert main([model_dir, "--gpu-memory-gb", "2.01", "--check"]) == 0
    assert main([model_dir, bigger, "--gpu-memory-gb", "2.01", "--check"]) == 1
    assert "NO" in capsys.readouterr().out


def test_cli_help_documents_check(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--check" in help_text and "exit with status 1 when a plan does not fit" in help_text
