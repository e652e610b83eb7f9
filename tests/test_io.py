"""Saved DuDe adapters reload exactly onto the original base, and bad adapters fail loudly."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_qwen2, perturb_trainable_
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

from dude_trl import DuDeConfig, get_dude_model
from dude_trl.layers import FINGERPRINT, INIT_A, INIT_B
from dude_trl.resume import restore_residual_for_resume_
from dude_trl.saving import load_dude_model, read_adapter_weights, read_dude_config

METHODS = ["dude", "dude_a", "dude_b", "pissa", "dora", "lora"]
TARGETS = ["q_proj", "v_proj", "up_proj"]
INPUT_IDS = torch.tensor([[5, 17, 42, 8, 66, 23, 9, 31], [12, 3, 77, 45, 60, 14, 29, 50]])


def dude_config(method: str = "dude", **kwargs) -> DuDeConfig:
    """A randomized-SVD configuration (the case where re-running the SVD cannot rebuild the model)."""
    return DuDeConfig(method=method, **{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "svd_niter": 2,
                                        "svd_seed": 3, **kwargs})


def trained_dude_model(method: str = "dude", **config_kwargs) -> torch.nn.Module:
    """A trained DuDe model on the tiny Qwen2 (seed 0)."""
    return perturb_trainable_(get_dude_model(make_qwen2(), dude_config(method, **config_kwargs), progress=False))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def frozen_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("base_layer.weight")}


@pytest.fixture(scope="module")
def saved_dude(tmp_path_factory):
    """(adapter directory, logits) of a trained `dude` model with a randomized SVD."""
    path = tmp_path_factory.mktemp("adapter")
    model = trained_dude_model()
    model.save_pretrained(path)
    return str(path), logits(model)


@pytest.mark.parametrize("method", METHODS)
def test_reload_is_exact_whatever_the_rng(tmp_path, method):
    model = trained_dude_model(method)
    model.save_pretrained(tmp_path)
    expected_logits, expected_weights = logits(model), frozen_weights(model)

    torch.manual_seed(1234)  # another RNG state than at initialisation
    loaded = load_dude_model(make_qwen2(), tmp_path, progress=False)

    # The residual W0 - s*B0@A0 is recomputed exactly as at initialisation: bit-identical.
    reloaded = frozen_weights(loaded)
    assert reloaded.keys() == expected_weights.keys() and len(reloaded) == 2 * len(TARGETS)
    for key, weight in expected_weights.items():
        assert torch.equal(reloaded[key], weight), key
    torch.testing.assert_close(logits(loaded), expected_logits, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_fresh_randomized_svd_gives_another_residual():
    """What the stored factors protect against: the same config with another svd_seed draws
    another residual, so re-running the initialisation cannot rebuild a saved model."""
    first = frozen_weights(trained_dude_model())
    second = frozen_weights(trained_dude_model(svd_seed=4))
    assert max((first[k] - second[k]).abs().max().item() for k in first) > 1e-4


def test_adapter_carries_init_factors_and_fingerprint(saved_dude):
    adapter_dir, _ = saved_dude
    weights = read_adapter_weights(adapter_dir)
    layers = {k.rsplit(".lora_", 1)[0] for k in weights}
    assert len(layers) == 2 * len(TARGETS)
    for layer in layers:
        assert weights[f"{layer}.{INIT_A}"].shape == weights[f"{layer}.lora_A.weight"].shape
        assert weights[f"{layer}.{INIT_B}"].shape == weights[f"{layer}.lora_B.weight"].shape
        assert weights[f"{layer}.{FINGERPRINT}"].shape == (5,)


def test_config_keeps_dude_fields(saved_dude):
    adapter_dir, _ = saved_dude
    config = read_dude_config(adapter_dir)
    assert isinstance(config, DuDeConfig)
    assert (config.method, config.svd_niter, config.svd_seed, config.use_dora) == ("dude", 2, 3, True)
    from_pretrained = DuDeConfig.from_pretrained(adapter_dir)
    assert isinstance(from_pretrained, DuDeConfig) and from_pretrained.method == "dude"
    assert from_pretrained.svd_seed == 3


def test_plain_peft_refuses_a_dude_adapter_and_names_the_loader(saved_dude):
    """PEFT would put the trained A, B, m on W0 instead of the residual (principal part twice)."""
    from peft import PeftModel

    adapter_dir, _ = saved_dude
    with pytest.raises(ValueError, match="load with dude_trl.get_dude_model"):
        PeftModel.from_pretrained(make_qwen2(), adapter_dir)
    lora = get_dude_model(make_qwen2(), DuDeConfig(method="lora", r=4, lora_alpha=8, target_modules=["q_proj"]), progress=False)
    assert lora.peft_config["default"].to_dict()["init_lora_weights"] is True  # no residual: PEFT loads it right


def test_get_dude_model_with_a_directory_reloads(saved_dude):
    adapter_dir, expected = saved_dude
    loaded = get_dude_model(make_qwen2(), adapter_dir, progress=False)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-6)


def test_trainable_reload_round_trips(saved_dude, tmp_path):
    adapter_dir, expected = saved_dude
    loaded = load_dude_model(make_qwen2(), adapter_dir, is_trainable=True, progress=False)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-6)
    # Saving the reloaded model writes the same adapter: factors and fingerprints survive reloads.
    loaded.save_pretrained(tmp_path)
    original, again = read_adapter_weights(adapter_dir), read_adapter_weights(tmp_path)
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key


def test_reload_by_path_in_bfloat16(saved_dude, tiny_model_dir):
    """A cast of the base (here fp32 -> bf16) is not mistaken for another base."""
    adapter_dir, expected = saved_dude
    loaded = load_dude_model(tiny_model_dir, adapter_dir, dtype=torch.bfloat16, progress=False)
    assert loaded.get_base_model().dtype == torch.bfloat16
    torch.testing.assert_close(logits(loaded).float(), expected, rtol=0, atol=0.1)


@pytest.mark.parametrize("method", ["dude", "pissa"])
def test_reload_onto_quantized_base_is_exact(tmp_path, tiny_model_dir, method):
    """QDuDe: the stored 4-bit residual q(W0 - s*B0@A0) is rebuilt bit for bit from the full-precision W0."""
    pytest.importorskip("bitsandbytes")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = perturb_trainable_(get_dude_model(tiny_model_dir, dude_config(method), quantization_config=nf4, progress=False))
    model.save_pretrained(tmp_path)
    expected_logits, expected_weights = logits(model), frozen_weights(model)

    torch.manual_seed(1234)
    loaded = load_dude_model(tiny_model_dir, tmp_path, quantization_config=nf4, progress=False)
    reloaded = frozen_weights(loaded)
    assert reloaded.keys() == expected_weights.keys() and reloaded
    for key, weight in expected_weights.items():
        assert torch.equal(reloaded[key], weight), key
    torch.testing.assert_close(logits(loaded), expected_logits, rtol=0, atol=1e-6)

    # Resuming a quantized run with the same factors keeps the residual; other factors cannot be
    # applied to a quantized residual (W0 is lost) and say so.
    restore_residual_for_resume_(loaded, tmp_path)
    assert all(torch.equal(w, expected_weights[k]) for k, w in frozen_weights(loaded).items())
    weights = load_file(tmp_path / "adapter_model.safetensors")
    other_factors = {k: v * 1.01 if "dude_init" in k else v for k, v in weights.items()}
    save_file(other_factors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="cannot give back the full-precision W0"):
        restore_residual_for_resume_(loaded, tmp_path)


def test_wrong_base_with_the_same_shapes_fails(saved_dude):
    adapter_dir, _ = saved_dude
    with pytest.raises(ValueError, match="not the one this adapter was trained on"):
        load_dude_model(make_qwen2(seed=1), adapter_dir, progress=False)


def test_base_with_other_shapes_fails(saved_dude):
    adapter_dir, _ = saved_dude
    torch.manual_seed(0)
    wider = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=make_qwen2().config.vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
    )
    with pytest.raises(ValueError, match="does not fit this Qwen2ForCausalLM.*other shapes"):
        load_dude_model(wider, adapter_dir, progress=False)


def test_base_with_fewer_layers_fails(saved_dude):
    adapter_dir, _ = saved_dude
    shallow = make_qwen2()
    shallow.model.layers = shallow.model.layers[:1]
    with pytest.raises(ValueError, match="belong to no adapted layer"):
        load_dude_model(shallow, adapter_dir, progress=False)


def test_truncated_weights_fail(saved_dude, tmp_path):
    adapter_dir, _ = saved_dude
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(adapter_dir, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    weights_path = tmp_path / "adapter_model.safetensors"
    os.truncate(weights_path, os.path.getsize(weights_path) - 100)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_dude_model(make_qwen2(), tmp_path, progress=False)


def test_truncated_config_fails(saved_dude, tmp_path):
    adapter_dir, _ = saved_dude
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        (tmp_path / "adapter_config.json").write_text(f.read()[:200])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dude_model(make_qwen2(), tmp_path, progress=False)


def test_missing_init_factors_fail(saved_dude, tmp_path):
    adapter_dir, _ = saved_dude
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "dude_init" not in k}, tmp_path / "adapter_model.safetensors")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        (tmp_path / "adapter_config.json").write_text(f.read())
    with pytest.raises(ValueError, match="no initial factors"):
        load_dude_model(make_qwen2(), tmp_path, progress=False)


def test_plain_peft_adapter_is_not_taken_for_dude(saved_dude, tmp_path):
    adapter_dir, _ = saved_dude
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        values = json.load(f)
    del values["method"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="not a DuDe adapter"):
        read_dude_config(tmp_path)


def _copy_adapter(adapter_dir: str, dst) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(adapter_dir, name), "rb") as src, open(dst / name, "wb") as out:
            out.write(src.read())


@pytest.mark.parametrize("edit", [{"lora_alpha": 16}, {"use_rslora": True}, {"alpha_pattern": {"v_proj": 2}}])
def test_an_edited_scaling_in_the_config_is_refused(saved_dude, tmp_path, edit):
    """The scaling enters the rebuilt residual W0 - s*B0@A0: an edited config would load silently wrong."""
    _copy_adapter(saved_dude[0], tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **edit}))
    with pytest.raises(ValueError, match="initial factors were made for 2: .*restore the lora_alpha"):
        load_dude_model(make_qwen2(), tmp_path, progress=False)


def test_the_implied_scaling_holds_for_every_svd_method_and_rslora(tmp_path):
    for method in ("dude_a", "dude_b", "pissa"):
        model = trained_dude_model(method, use_rslora=True, lora_alpha=6)
        model.save_pretrained(tmp_path / method)
        torch.testing.assert_close(
            logits(load_dude_model(make_qwen2(), tmp_path / method, progress=False)), logits(model), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_tensors_are_refused(saved_dude, tmp_path, value):
    _copy_adapter(saved_dude[0], tmp_path)
    weights_path = tmp_path / "adapter_model.safetensors"
    weights = load_file(weights_path)
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = value
    save_file(weights, weights_path)
    with pytest.raises(ValueError, match=f"NaN or infinite values in 1 of {len(weights)} tensors.*{key}"):
        load_dude_model(make_qwen2(), tmp_path, progress=False)


def test_the_wrong_base_error_names_the_base_trained_on(tmp_path):
    trained_on, other = tmp_path / "base-a", tmp_path / "base-b"
    make_qwen2(seed=0).save_pretrained(trained_on)
    make_qwen2(seed=1).save_pretrained(other)
    get_dude_model(str(trained_on), dude_config(), progress=False).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="not the one this adapter was trained on") as caught:
        load_dude_model(str(other), tmp_path / "adapter", progress=False)
    assert f"({trained_on})" in str(caught.value) and str(other) not in str(caught.value)
