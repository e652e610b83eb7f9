"""Exported adapters load in vanilla PEFT (without dude_trl) and merged models match the DuDe model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_qwen2, perturb_trainable_
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from dude_trl import DuDeConfig, get_dude_model
from dude_trl.export import export_dora_adapter, merge_to_base
from dude_trl.export.__main__ import main

METHODS = ["dude", "dude_a", "dude_b", "pissa", "dora", "lora"]
INPUT_IDS = [[5, 17, 42, 8, 66, 23, 9, 31], [12, 3, 77, 45, 60, 14, 29, 50]]
ATOL = 1e-4  # fp32

# Runs in a fresh interpreter that never imports dude_trl: what a user without it installed has.
VANILLA_PEFT_SCRIPT = """
import json, sys, warnings
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

cases, input_ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
results, problems = {}, []
for name, (base_dir, adapter_dir) in cases.items():
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    problems += [f"{name}: {w.message}" for w in caught if "keys" in str(w.message) or "Unexpected" in str(w.message)]
    with torch.no_grad():
        results[name] = model(input_ids=input_ids).logits
assert "dude_trl" not in sys.modules, "the vanilla PEFT check imported dude_trl"
assert not problems, problems
torch.save(results, out)
"""


def make_gpt2() -> GPT2LMHeadModel:
    """GPT-2 stores its projections as Conv1D (``in x out``), which exercises fan_in_fan_out."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def trained(model: PreTrainedModel, config: DuDeConfig) -> PeftModel:
    """A trained DuDe model (`perturb_trainable_`) on `model`."""
    return perturb_trainable_(get_dude_model(model, config, progress=False))


def dude_config(method: str, **kwargs) -> DuDeConfig:
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"], "svd_niter": 2, **kwargs}
    return DuDeConfig(method=method, **kwargs)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(INPUT_IDS)).logits


CASES = {
    **{method: (make_qwen2, lambda m=method: dude_config(m)) for method in METHODS},
    # rsLoRA, a per-layer rank and a per-layer alpha: the export needs per-layer patterns.
    "patterns": (
        make_qwen2,
        lambda: dude_config("dude", use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}),
    ),
    "conv1d": (
        make_gpt2, lambda: DuDeConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """For every case: (base dir, exported adapter dir, DuDe model logits)."""
    root = tmp_path_factory.mktemp("export")
    results = {}
    for name, (make_base, make_config) in CASES.items():
        base_dir = root / f"base-{make_base.__name__}"
        if not base_dir.exists():
            make_base().save_pretrained(base_dir)
        model = trained(make_base(), make_config())
        results[name] = (str(base_dir), export_dora_adapter(model, root / name), logits(model))
    return results


def test_exported_adapters_load_in_vanilla_peft(exported, tmp_path):
    cases = {name: [base_dir, adapter_dir] for name, (base_dir, adapter_dir, _) in exported.items()}
    out = tmp_path / "logits.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", VANILLA_PEFT_SCRIPT, json.dumps(cases), json.dumps(INPUT_IDS), str(out)],
        check=True, cwd=tmp_path, env=env, timeout=300,
    )
    vanilla = torch.load(out)
    for name, (_, _, expected) in exported.items():
        torch.testing.assert_close(vanilla[name], expected, rtol=0, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


def test_exported_config_is_plain_lora(exported):
    _, adapter_dir, _ = exported["dude"]
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert "method" not in config and "svd_niter" not in config
    # rank 2r, s' = lora_alpha' / r' = s = 8 / 4 without rsLoRA.
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (8, 16, False, True)
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert not any("lora_dude" in k for k in weights)
    A = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    B = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert A.shape == (8, 32) and B.shape == (32, 8)

    _, adapter_dir, _ = exported["pissa"]
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        assert json.load(f)["use_dora"] is False

    _, adapter_dir, _ = exported["patterns"]
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    s_default, s_q, s_v = 8 / 4**0.5, 16 / 4**0.5, 8 / 2**0.5  # rsLoRA scalings of the DuDe model
    assert (config["r"], config["use_rslora"]) == (8, False)
    assert config["lora_alpha"] == pytest.approx(s_default * 8)
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 4 for i in range(2)}
    assert config["alpha_pattern"] == pytest.approx(
        {**{f"model.layers.{i}.self_attn.v_proj": s_v * 4 for i in range(2)},
         **{f"model.layers.{i}.self_attn.q_proj": s_q * 8 for i in range(2)}}
    )


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_matches(method):
    model = trained(make_qwen2(), dude_config(method))
    expected = logits(model)
    merged = merge_to_base(model)
    assert isinstance(merged, PreTrainedModel) and not isinstance(merged, PeftModel)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=ATOL)


def test_merge_on_a_quantized_base_dequantizes(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = get_dude_model(tiny_model_dir, dude_config("dude"), quantization_config=nf4, progress=False)
    model = perturb_trainable_(model)
    expected = logits(model)
    merged = merge_to_base(model)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=ATOL)


def test_export_refuses_merged_layers():
    model = trained(make_qwen2(), dude_config("dude"))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        export_dora_adapter(model, "unused")


def test_cli_exports_merged_model_and_dora_adapter(tmp_path, tiny_model_dir):
    model = trained(make_qwen2(), dude_config("dude_b"))
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    main(["--adapter", str(tmp_path / "adapter"), "--base", tiny_model_dir, "--to", "merged", "--out",
          str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32  # the base's own dtype
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=ATOL)
    assert os.path.isfile(tmp_path / "merged" / "tokenizer.json")

    main(["--adapter", str(tmp_path / "adapter"), "--base", tiny_model_dir, "--to", "dora", "--out",
          str(tmp_path / "dora")])
    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "dora")
    torch.testing.assert_close(logits(vanilla.eval()), expected, rtol=0, atol=ATOL)
    with open(tmp_path / "dora" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == tiny_model_dir


def test_cli_refuses_wrong_base(tmp_path):
    model = trained(make_qwen2(), dude_config("dude"))
    model.save_pretrained(tmp_path / "adapter")
    make_qwen2(seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not the one this adapter was trained on"):
        main(["--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "other"), "--to", "merged", "--out",
              str(tmp_path / "merged")])
