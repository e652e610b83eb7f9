"""QDuDe: DuDe on bitsandbytes 4-bit (NF4/FP4) and 8-bit bases, on CPU.

The tiny models get weights with a decaying spectrum (``W = U diag(s) V^T``), as pretrained
weights have: on a random-init model the spectrum is flat and the top-r SVD removes little.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from datasets import Dataset
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AwqConfig, BitsAndBytesConfig, GPTQConfig
from trl import SFTConfig

from _qdude_reference import init_errors, lora_layers, reference_model
from conftest import decaying_spectrum_, make_qwen2, make_tokenizer, perturb_trainable_
from dude_trl import DuDeConfig, DuDeSFTTrainer
from dude_trl.bases.bnb import check_quantized_model, merge_and_dequantize, validate_quantization_config
from dude_trl.bases.bnb_storage import QuantSpec, dequantized_weight, is_bnb_layer, prepare_bnb_layers_
from dude_trl.checkpoint import CheckpointWeights
from dude_trl.model import get_dude_model
from dude_trl.svd import fit_factors
from dude_trl.variant import DuDeLinearVariant

TARGETS = ["q_proj", "v_proj"]
FP32 = torch.float32
QUANT = {
    "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=FP32),
    "nf4-dq": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=FP32
    ),
    "fp4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=FP32),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}
METHODS = ["dude", "dude_a", "dude_b", "pissa", "dora", "lora"]
SVD_METHODS = ["dude", "dude_a", "dude_b", "pissa"]
ATOL = 1e-5  # float32 logits of the tiny models are O(0.1-1)


def _config(method: str = "dude", **kw) -> DuDeConfig:
    return DuDeConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, method=method, **kw)


def _qdude(source, method: str = "dude", quant: str = "nf4", **config_kw):
    """get_dude_model on a bitsandbytes base, the public entry point."""
    return get_dude_model(source, _config(method, **config_kw), quantization_config=QUANT[quant](), progress=False)


def _logits(model, ids: torch.Tensor, train_mode: bool) -> torch.Tensor:
    # bitsandbytes' 8-bit CPU matmul is exact (dequantize + matmul) only in training mode; in eval
    # mode it also quantizes the activations (LLM.int8()). Dropout is 0 everywhere here.
    model.train(train_mode)
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quant, method",
    [("nf4", "dude"), ("fp4", "dude"), ("int8", "dude"), ("nf4", "dude_a"), ("nf4", "dude_b"), ("nf4", "pissa")],
)
def test_init_error_below_plain_quantization(model_dir, float_model, quant, method):
    """The split only moves singular values between A and B: s*B@A, hence the error, is the same
    for every SVD method."""
    model = _qdude(model_dir, method, quant)
    errors = init_errors(model, float_model)
    assert len(errors) == 4
    for dude_err, plain_err in errors:
        assert dude_err < plain_err
    mean_ratio = sum(d / p for d, p in errors) / len(errors)
    assert mean_ratio < 0.85, f"QDuDe error only {100 * (1 - mean_ratio):.1f}% below plain {quant}"
    # A, B stay float32 (the principal components are never quantized).
    for layer in lora_layers(model).values():
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert is_bnb_layer(layer.get_base_layer())


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "quant, method",
    [("nf4", m) for m in METHODS]
    + [("int8", "dude"), ("int8", "lora"), ("nf4-dq", "dude"), ("fp4", "dude_b")]
    + [pytest.param("int8", m, marks=SLOW) for m in ("dude_a", "dude_b", "pissa", "dora")],
)
def test_output_at_init_equals_dequantized_residual_plus_factors(model_dir, float_model, quant, method):
    model = _qdude(model_dir, method, quant)
    ref = reference_model(float_model, model)
    train_mode = quant == "int8"
    torch.testing.assert_close(_logits(model, IDS, train_mode), _logits(ref, IDS, train_mode), atol=ATOL, rtol=0)
    if method in ("dude", "dude_a", "dude_b", "dora"):
        layer = next(iter(lora_layers(model).values()))
        assert isinstance(layer.lora_variant["default"], DuDeLinearVariant)
    # The magnitude is the row norm of deq(W_res) + s*B@A, so the DuDe scale is 1 at init.
    if method != "lora" and method != "pissa":
        for layer in lora_layers(model).values():
            merged = dequantized_weight(layer.get_base_layer()) + layer.scaling["default"] * (
                layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            )
            torch.testing.assert_close(
                layer.lora_magnitude_vector["default"].weight, merged.norm(dim=1), atol=1e-6, rtol=1e-6
            )


def test_output_at_init_with_bias_and_eval_mode(tmp_path):
    """Qwen2 has biases on q/v (the bias path of the DuDe forward); 4-bit is exact in eval mode too."""
    fm = decaying_spectrum_(make_qwen2(), seed=1)
    fm.save_pretrained(tmp_path)
    model = _qdude(str(tmp_path))
    ref = reference_model(fm, model)
    torch.testing.assert_close(_logits(model, IDS, False), _logits(ref, IDS, False), atol=ATOL, rtol=0)


def test_quant_iters_lowers_error_and_stores_the_matching_residual(model_dir, float_model):
    plain = _qdude(model_dir)
    refined = _qdude(model_dir, quant_iters=4)
    before, after = init_errors(plain, float_model), init_errors(refined, float_model)
    for (b, _), (a, _) in zip(before, after):
        assert a <= b + 1e-7
    assert sum(a for a, _ in after) < 0.97 * sum(b for b, _ in before)
    # The stored residual is exactly q(W0 - s*B@A) for the stored A, B (what an exact reload rebuilds).
    for name, layer in lora_layers(refined).items():
        base = layer.get_base_layer()
        W0 = float_model.get_submodule(name).weight.detach()
        residual = W0 - layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        assert torch.equal(dequantized_weight(base), QuantSpec.from_layer(base).roundtrip(residual))


def test_fit_factors_keeps_svd_identity():
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(48, 64, generator=gen) @ torch.diag(0.9 ** torch.arange(64.0)) @ torch.randn(64, 64, generator=gen)
    spec = QuantSpec(bits=4, quant_type="nf4")
    for method in SVD_METHODS:
        f0 = fit_factors(W0, 8, 2.0, method, spec.roundtrip)
        f3 = fit_factors(W0, 8, 2.0, method, spec.roundtrip, quant_iters=3)
        assert f0.round == 0 and f3.error <= f0.error
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        torch.testing.assert_close(2.0 * f0.B @ f0.A, (U[:, :8] * S[:8]) @ Vh[:8], atol=1e-4, rtol=1e-4)
        plain = (W0 - spec.roundtrip(W0)).norm().item()
        assert f0.error < plain


def test_full_precision_model_object_is_quantized_like_its_path(model_dir, float_model):
    from_path = _qdude(model_dir)
    from_object = _qdude(copy.deepcopy(float_model))
    for (name, a), (_, b) in zip(lora_layers(from_path).items(), lora_layers(from_object).items()):
        assert torch.equal(a.lora_A["default"].weight, b.lora_A["default"].weight), name
        assert torch.equal(a.get_base_layer().weight.data, b.get_base_layer().weight.data), name


def test_already_quantized_model_is_decomposed_with_a_note(model_dir, float_model, caplog):
    quantized = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=QUANT["nf4"](), dtype=torch.float32)
    W0_deq = {n: dequantized_weight(quantized.get_submodule(n)) for n in ("model.layers.0.self_attn.q_proj",)}
    with caplog.at_level(logging.WARNING, logger="dude_trl.bases.bnb"):
        model = get_dude_model(quantized, _config("dude"), progress=False)
    assert "more accurate" in caplog.text
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    # Decomposed from deq(q(W0)), re-quantizing the residual adds a second rounding: the error
    # against the true W0 stays of the order of plain quantization's (loading from full precision
    # is what makes it lower, hence the note).
    effective = dequantized_weight(layer.get_base_layer()) + layer.scaling["default"] * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    W0 = float_model.get_submodule("model.layers.0.self_attn.q_proj").weight.detach()
    plain = (W0 - W0_deq["model.layers.0.self_attn.q_proj"]).norm()
    assert (W0 - effective).norm() < 1.25 * plain
    ref = reference_model(float_model, model)
    torch.testing.assert_close(_logits(model, IDS, False), _logits(ref, IDS, False), atol=ATOL, rtol=0)


def test_get_dude_model_routes_an_already_quantized_model(model_dir):
    """No quantization_config needed for a model that is already bitsandbytes-quantized."""
    quantized = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=QUANT["int8"](), dtype=FP32)
    model = get_dude_model(quantized, _config("dude_b"), progress=False)
    layer = lora_layers(model)["model.layers.1.self_attn.v_proj"]
    assert is_bnb_layer(layer.get_base_layer()) and "default" in layer.lora_dude_init_A
    assert losses_fall(model)


def test_bf16_double_quant_base_trains(model_dir, float_model):
    """The usual QLoRA setup: bf16 load and compute dtype, NF4 with double quantization."""
    BF16 = torch.bfloat16
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=BF16
    )
    config = _config("dude", quant_iters=1)
    model = get_dude_model(model_dir, config, quantization_config=bnb, dtype=BF16, progress=False)
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        assert base.weight.quant_state.dtype == torch.bfloat16 and base.weight.quant_state.nested
        assert layer.lora_A["default"].weight.dtype == torch.float32
    for dude_err, plain_err in init_errors(model, float_model):
        assert dude_err < plain_err
    assert losses_fall(model)


def test_checkpoint_weights_reads_by_module_name(model_dir, float_model):
    weights = CheckpointWeights.from_pretrained(model_dir, base_model_prefix="model")
    name = "model.layers.1.self_attn.v_proj"
    W = float_model.get_submodule(name).weight
    assert torch.equal(weights.get(name, tuple(W.shape)), W)
    assert torch.equal(weights.get("layers.1.self_attn.v_proj", tuple(W.shape)), W)  # base-model naming
    assert weights.get(name, (3, 3)) is None and weights.get("model.nope", tuple(W.shape)) is None
    assert CheckpointWeights.from_pretrained(str(model_dir) + "-missing") is None


def test_sharded_checkpoint_is_read_in_full_precision(tmp_path, float_model):
    float_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    weights = CheckpointWeights.from_pretrained(str(tmp_path))
    assert len(set(weights.key_to_file.values())) > 1
    model = _qdude(str(tmp_path))
    for dude_err, plain_err in init_errors(model, float_model):
        assert dude_err < plain_err


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qconfig, message",
    [
        (lambda: GPTQConfig(bits=4), "GPTQ"),
        (lambda: AwqConfig(bits=4), "AWQ"),
        (lambda: {"quant_method": "gptq", "bits": 4}, "GPTQ"),
        (lambda: BitsAndBytesConfig(), "neither load_in_4bit nor load_in_8bit"),
        (lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True), "llm_int8_has_fp16_weight"),
    ],
)
def test_unsupported_quantization_configs_raise(model_dir, qconfig, message):
    with pytest.raises(ValueError, match=message):
        validate_quantization_config(qconfig())
    with pytest.raises(ValueError, match=message):
        get_dude_model(model_dir, _config("dude"), quantization_config=qconfig(), progress=False)


def test_prequantized_gptq_checkpoint_and_model_raise(tmp_path, float_model):
    float_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPTQ fits its quantized weights to a calibration set"):
        _qdude(str(tmp_path))

    class FakeAwqModel(nn.Module):
        quantization_method = "awq"

    with pytest.raises(ValueError, match="AWQ"):
        check_quantized_model(FakeAwqModel())


# --------------------------------------------------------------------------------------------
# Training, merge, save
# --------------------------------------------------------------------------------------------


def _train(model, steps: int = 6, lr: float = 1e-2) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ids = torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def losses_fall(model, steps: int = 6) -> bool:
    losses = _train(model, steps)
    return all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "quant, method",
    [("nf4", "dude"), ("int8", "dude")]
    + [pytest.param("nf4", m, marks=SLOW) for m in METHODS if m != "dude"]
    + [pytest.param("int8", "pissa", marks=SLOW)],
)
def test_training_steps_reduce_loss(model_dir, quant, method):
    model = _qdude(model_dir, method, quant)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert losses_fall(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable) and any(".lora_B." in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable) == (method in ("dude", "dude_a", "dude_b", "dora"))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("quant", ["nf4", pytest.param("int8", marks=SLOW)])
def test_merge_and_dequantize_gives_full_precision_model(model_dir, quant):
    model = _qdude(model_dir, "dude", quant)
    _train(model, steps=3)
    expected = _logits(model, IDS, train_mode=True)
    peft_merged = copy.deepcopy(model).merge_and_unload()  # PEFT's own merge re-quantizes W_res + adapter
    merged = merge_and_dequantize(model, dtype=torch.float32)
    assert not any(is_bnb_layer(m) or isinstance(m, LoraLayer) for m in merged.modules())
    assert not getattr(merged, "is_loaded_in_4bit", False) and not getattr(merged, "is_loaded_in_8bit", False)
    assert getattr(merged.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    got = _logits(merged, IDS, train_mode=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # PEFT's merge_and_unload works on the quantized DuDe model too, but re-quantizing the principal
    # components costs accuracy: the full-precision merge is the faithful one.
    assert is_bnb_layer(peft_merged.model.layers[0].self_attn.q_proj)
    requantized = _logits(peft_merged, IDS, train_mode=True)
    assert torch.isfinite(requantized).all()
    assert (requantized - expected).abs().max() > 10 * (got - expected).abs().max()


def test_saved_adapter_holds_factors_that_rebuild_the_residual(model_dir, float_model, tmp_path):
    model = _qdude(model_dir, quant_iters=2)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    for name, layer in lora_layers(model).items():
        prefix = f"base_model.model.{name}."
        for key in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_dude_init_A", "lora_dude_init_B"):
            assert any(k.startswith(prefix + key) for k in saved), prefix + key
        A, B = saved[prefix + "lora_dude_init_A"], saved[prefix + "lora_dude_init_B"]
        assert A.dtype == torch.float32
        # A fresh quantization of W0 - s*B_init@A_init is bit-identical to the stored residual.
        W0 = float_model.get_submodule(name).weight.detach()
        base = layer.get_base_layer()
        rebuilt = QuantSpec.from_layer(base).quantize(W0 - layer.scaling["default"] * (B @ A))
        assert torch.equal(rebuilt.data, base.weight.data)


@pytest.mark.parametrize("quant", ["nf4", pytest.param("int8", marks=SLOW)])
def test_trained_adapter_reloads_onto_a_fresh_quantized_base(model_dir, tmp_path, quant):
    """save_pretrained, then dude_trl.saving.load_dude_model rebuilds q(W0 - s*B0@A0) from the
    full-precision checkpoint and reproduces the trained model's outputs."""
    from dude_trl.saving import load_dude_model

    model = _qdude(model_dir, "dude", quant, quant_iters=1)
    _train(model, steps=3)
    expected = _logits(model, IDS, train_mode=True)
    model.save_pretrained(tmp_path)
    reloaded = load_dude_model(model_dir, tmp_path, quantization_config=QUANT[quant](), progress=False)
    for (name, a), (_, b) in zip(lora_layers(model).items(), lora_layers(reloaded).items()):
        assert torch.equal(a.get_base_layer().weight.data, b.get_base_layer().weight.data), name
    torch.testing.assert_close(_logits(reloaded, IDS, train_mode=True), expected, atol=ATOL, rtol=0)


def test_reload_checks_the_recorded_quantization(model_dir, tmp_path):
    """A QDuDe adapter records its base's scheme: reloading it without a quantization config or
    with another scheme fails by name instead of rebuilding another residual; the export CLI
    reloads it quantized the same way, so the merged model equals the trained one."""
    from dude_trl.bases.bnb import bnb_config_from_record
    from dude_trl.export.__main__ import main as export_main
    from dude_trl.saving import load_dude_model

    model = _qdude(model_dir, "dude", "nf4")
    _train(model, steps=2)
    record = model.peft_config["default"].base_quantization
    assert record == {"bits": 4, "quant_type": "nf4", "double_quant": False}
    expected = _logits(model, IDS, train_mode=False)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="trained on a bitsandbytes base.*quantization_config"):
        load_dude_model(model_dir, tmp_path / "adapter", progress=False)
    with pytest.raises(ValueError, match="but this base is quantized as .*fp4"):
        load_dude_model(model_dir, tmp_path / "adapter", quantization_config=bnb_config_from_record(
            {"bits": 4, "quant_type": "fp4", "double_quant": False}), progress=False)  # fmt: skip
    reloaded = load_dude_model(model_dir, tmp_path / "adapter", quantization_config=bnb_config_from_record(record),
                               progress=False)  # fmt: skip
    torch.testing.assert_close(_logits(reloaded, IDS, train_mode=False), expected, atol=ATOL, rtol=0)

    export_main(["--adapter", str(tmp_path / "adapter"), "--base", str(model_dir), "--to", "merged",
                 "--out", str(tmp_path / "merged")])  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(merged(IDS).logits, expected, atol=ATOL, rtol=0)


def test_trainer_loads_quantized_and_trains_with_gradient_checkpointing(model_dir, float_model, tmp_path):
    data = Dataset.from_dict({"text": [f"Q: {i} plus {i + 3}? A: {2 * i + 3}." for i in range(32)]})
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, gradient_checkpointing=True,
        max_length=32,
    )
    trainer = DuDeSFTTrainer(
        model=model_dir, args=args, train_dataset=data, processing_class=make_tokenizer(),
        quantization_config=QUANT["nf4"](), peft_config=_config("dude"),
    )
    model = trainer.model
    assert getattr(model, "is_loaded_in_4bit", False)
    assert model.peft_config["default"].base_quantization == {"bits": 4, "quant_type": "nf4", "double_quant": False}
    # W0 came from the checkpoint in full precision; A, B stay float32 despite TRL's QLoRA bf16 cast.
    for dude_err, plain_err in init_errors(model, float_model):
        assert dude_err < plain_err
    for layer in lora_layers(model).values():
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert isinstance(layer.lora_variant["default"], DuDeLinearVariant)
    trainer.train()
    assert model.get_base_model().is_activation_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])


# --------------------------------------------------------------------------------------------
# The pretrained model behind the adapter
# --------------------------------------------------------------------------------------------


def _plain_quantized(model_dir: str, quant: str) -> nn.Module:
    """Plain bitsandbytes quantization of the checkpoint, computing exactly with deq(W) on CPU as
    the QDuDe layers do (bitsandbytes' AVX512-BF16 repacking rounds the scales and fails for
    ``in_features < blocksize``)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=QUANT[quant](), dtype=FP32)
    prepare_bnb_layers_(model)
    return model


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_disable_adapter_on_a_quantized_base_gives_residual_plus_principal_part(model_dir, float_model, quant):
    """With the adapter disabled, a QDuDe layer computes deq(q(W_res)) x + s B0 A0 x: the model
    QDuDe's initialisation built, closer to the full-precision W0 than plain deq(q(W0))."""
    model = _qdude(model_dir, quant=quant)
    at_init = reference_model(float_model, model)
    perturb_trainable_(model)
    train_mode = quant == "int8"
    with model.disable_adapter():
        disabled = _logits(model, IDS, train_mode)
    torch.testing.assert_close(disabled, _logits(at_init, IDS, train_mode), atol=ATOL, rtol=0)
    pretrained = _logits(float_model, IDS, train_mode)
    plain = _logits(_plain_quantized(model_dir, quant), IDS, train_mode)
    assert (disabled - pretrained).abs().max() < (plain - pretrained).abs().max()


def test_unload_on_a_quantized_base_requantizes_the_pretrained_weight(model_dir, float_model):
    model = perturb_trainable_(_qdude(model_dir))
    unloaded = model.unload()
    pretrained, plain = float_model, _plain_quantized(model_dir, "nf4")
    for name, module in unloaded.named_modules():
        if is_bnb_layer(module) and name.rsplit(".", 1)[-1] in TARGETS:
            W0 = pretrained.get_submodule(name).weight
            error = (dequantized_weight(module) - W0).norm()
            plain_error = (dequantized_weight(plain.get_submodule(name)) - W0).norm()
            assert error < 1.15 * plain_error, name  # measured 1.04-1.06x: a second rounding of W0's grid
