"""get_dude_model: initialisation exactness for every method and the errors users get."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_llama, make_qwen2
from dude_trl import DuDeConfig, get_dude_model
from dude_trl.config import METHODS
from dude_trl.variant import DuDeLinearVariant

IDS = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def _config(method: str, **kw) -> DuDeConfig:
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return DuDeConfig(r=4, lora_alpha=8, method=method, **kw)


def _outputs(model, targets: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits on `IDS` and the output of every module whose name ends in one of `targets`.

    The logits alone would hide errors in q_proj: with small weights attention is nearly
    uniform, so even a 1% error in q's output moves the logits by only ~2e-5."""
    outputs, hooks = {}, []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            key = name.removeprefix("base_model.model.")
            hooks.append(module.register_forward_hook(lambda m, i, o, key=key: outputs.__setitem__(key, o.detach())))
    logits = model(IDS).logits
    for hook in hooks:
        hook.remove()
    return logits, outputs


def _assert_unchanged(base, model, targets: tuple[str, ...]) -> None:
    expected_logits, expected = _outputs(base, targets)
    logits, got = _outputs(model, targets)
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [make_llama, make_qwen2], ids=["no_bias", "bias"])
def test_output_unchanged_at_init(method, make):
    base = make()
    model = get_dude_model(copy.deepcopy(base), _config(method), progress=False)
    assert isinstance(model, PeftModel)
    _assert_unchanged(base, model, ("q_proj", "v_proj"))


@pytest.mark.parametrize("method", METHODS)
def test_output_unchanged_at_init_conv1d(method):
    """transformers' Conv1D always has a bias (its forward is an addmm)."""
    base = _gpt2()
    config = _config(method, target_modules=["c_attn"], fan_in_fan_out=True)
    model = get_dude_model(copy.deepcopy(base), config, progress=False)
    _assert_unchanged(base, model, ("c_attn",))


@pytest.mark.parametrize("method", ["dude", "dude_a", "dude_b", "pissa"])
def test_svd_init_invariants(method):
    base = make_qwen2()
    W0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_dude_model(copy.deepcopy(base), _config(method, svd_niter=None), progress=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    U, S, Vh = torch.linalg.svd(W0)
    principal = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(s * B @ A, principal, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, W0 - s * B @ A, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_dude_init_A["default"], A.detach())
    torch.testing.assert_close(layer.lora_dude_init_B["default"], B.detach())
    if method != "pissa":
        torch.testing.assert_close(
            layer.lora_magnitude_vector["default"].weight, torch.linalg.vector_norm(W0, dim=1), atol=1e-5, rtol=0
        )
        assert isinstance(layer.lora_variant["default"], DuDeLinearVariant)
    else:
        assert "default" not in layer.lora_variant


def test_method_selects_magnitude_and_base_change():
    base = make_llama()
    W0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    for method, has_mag, changes_base in [
        ("lora", False, False), ("dora", True, False), ("pissa", False, True), ("dude", True, True),
    ]:
        model = get_dude_model(copy.deepcopy(base), _config(method), progress=False)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert ("default" in layer.lora_magnitude_vector) == has_mag, method
        assert (not torch.equal(layer.base_layer.weight, W0)) == changes_base, method


def test_matches_peft_dora_pissa_outputs_and_gradients():
    base = make_qwen2()
    ours = get_dude_model(copy.deepcopy(base), _config("dude"), progress=False)
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights="pissa")
    theirs = get_peft_model(copy.deepcopy(base), peft_cfg)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.train(); theirs.train()
    out_ours, out_theirs = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=0)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_theirs.keys() and grads_ours
    for name in grads_ours:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_model_supported():
    """The SVD runs in float32 on the bf16 weight and the residual is cast back: s*B@A is the
    float32 top-r part of W0 and W_res + s*B@A equals W0 up to the residual's bf16 rounding."""
    base = make_llama().to(torch.bfloat16)
    W0 = base.model.layers[0].self_attn.q_proj.weight.detach().float()
    expected = base(IDS).logits.float()
    model = get_dude_model(copy.deepcopy(base), _config("dude"), progress=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    assert A.dtype == B.dtype == torch.float32
    U, S, Vh = torch.linalg.svd(W0)
    torch.testing.assert_close(s * B @ A, U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], atol=1e-5, rtol=0)
    residual = layer.base_layer.weight.float()
    bf16_ulp = residual.abs().max().item() * 2**-8
    assert (residual + s * B @ A - W0).abs().max() <= bf16_ulp
    out = model(IDS).logits.float()
    assert (out - expected).abs().max() < 0.1 * expected.abs().max()


def test_randomized_svd_reproducible_per_seed():
    base = make_llama()
    a = get_dude_model(copy.deepcopy(base), _config("dude", svd_niter=2, svd_seed=3), progress=False)
    b = get_dude_model(copy.deepcopy(base), _config("dude", svd_niter=2, svd_seed=3), progress=False)
    c = get_dude_model(copy.deepcopy(base), _config("dude", svd_niter=2, svd_seed=4), progress=False)
    key = "base_model.model.model.layers.1.self_attn.v_proj.base_layer.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    torch.testing.assert_close(a(IDS).logits, base(IDS).logits, atol=1e-5, rtol=0)


def test_save_includes_init_factors(tmp_path):
    model = get_dude_model(make_llama(), _config("dude"), progress=False)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.endswith("q_proj.lora_dude_init_A") for k in keys)
    assert any(k.endswith("q_proj.lora_magnitude_vector") or "lora_magnitude_vector" in k for k in keys)
    assert '"method": "dude"' in (tmp_path / "adapter_config.json").read_text()


def test_loads_from_path(tiny_model_dir):
    model = get_dude_model(tiny_model_dir, _config("dude"), progress=False)
    assert isinstance(model, PeftModel)
    assert next(model.parameters()).dtype == torch.float32


def test_peft_target_expansion_is_kept():
    """`"all-linear"` and PEFT's per-architecture defaults (`target_modules=None`) work as in PEFT."""
    model = get_dude_model(make_llama(), DuDeConfig(r=4, lora_alpha=8, target_modules="all-linear"), progress=False)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_dude_init_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model = get_dude_model(make_llama(), DuDeConfig(r=4, lora_alpha=8, target_modules=None), progress=False)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_dude_init_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_unsupported_target_raises_in_the_trainer_path_too():
    """TRL injects the adapter itself; an Embedding target must not be skipped silently."""
    from dude_trl import initialize_dude_

    model = get_peft_model(make_llama(), DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match="Linear and Conv1D.*embed_tokens.*Embedding"):
        initialize_dude_(model, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=64), "r=64 exceeds min\\(out, in\\)=32"),
        (dict(target_modules=["nonexistent"]), "match no module.*q_proj"),
        (dict(target_modules=["embed_tokens"]), "Linear and Conv1D.*Embedding"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kwargs}
    with pytest.raises(ValueError, match=match):
        get_dude_model(make_llama(), DuDeConfig(**kwargs), progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="Unknown DuDe method"):
        DuDeConfig(method="qlora")
    with pytest.raises(ValueError, match="svd_oversample must be >= 0"):
        DuDeConfig(svd_niter=2, svd_oversample=-3)
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        DuDeConfig(method="dude", lora_alpha=0)
    with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\] must be > 0 \(got -8\)"):
        DuDeConfig(method="dude", alpha_pattern={"q_proj": -8})
    with pytest.raises(ValueError, match="must be > 0 \\(got nan\\)"):
        DuDeConfig(method="pissa", alpha_pattern={"v_proj": float("nan")})
    assert DuDeConfig(method="lora", alpha_pattern={"q_proj": -8}).alpha_pattern == {"q_proj": -8}  # no SVD: PEFT's rules
    with pytest.raises(ValueError, match="init_lora_weights"):
        DuDeConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="use_dora=True contradicts"):
        DuDeConfig(method="lora", use_dora=True)
    assert DuDeConfig(method="dude").use_dora and not DuDeConfig(method="pissa").use_dora
    with pytest.raises(TypeError, match="DuDeConfig"):
        get_dude_model(make_llama(), LoraConfig(target_modules=["q_proj"]))
