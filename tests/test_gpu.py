"""Device checks (`pytest -m gpu`): the DuDe forward/backward, bf16 training and QDuDe on
bitsandbytes' 4-bit kernels, each against a float32 reference.

They run on CUDA when it is there. ``DUDE_TEST_DEVICE=cpu`` runs the same code on the CPU
(`benchmarks/gpu/run.sh --smoke`, in CI), so nothing they exercise goes untested without a GPU;
the CPU-vs-device comparisons are then trivially close, the rest is as strict as on CUDA.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from transformers import BitsAndBytesConfig

from _qdude_reference import init_errors, lora_layers, reference_model
from conftest import decaying_spectrum_, make_llama, make_qwen2, perturb_trainable_
from dude_trl import DuDeConfig, get_dude_model, load_dude_model

DEVICE = os.environ.get("DUDE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="no CUDA device (DUDE_TEST_DEVICE=cpu runs these on the CPU)"),
]

METHODS = ["dude", "dude_a", "dude_b", "pissa", "dora", "lora"]
TARGETS = ["q_proj", "v_proj"]
FP32_RTOL = 1e-5  # float32 on both sides, different reduction orders
BF16_RTOL = 2e-2  # bf16 operands: 1e-3..1e-2 relative error expected


@pytest.fixture(autouse=True)
def strict_fp32():
    """Full float32 matmuls on CUDA (no TF32), so fp32 comparisons mean fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def config(method: str = "dude", **kw) -> DuDeConfig:
    return DuDeConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, method=method, **kw)


def ids_on(device, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def loss_and_grads(model, ids) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out.loss.detach(), out.logits.detach(), grads


def train(model, ids, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------------------------
# Full precision: the device computes what the CPU computes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_on_device_equals_fp32_cpu_reference(method):
    """A trained-looking adapter moved with ``.to(device)``: logits, loss and every trainable
    gradient equal the CPU's (Qwen2: biases on q/v exercise the bias path)."""
    cpu_model = perturb_trainable_(get_dude_model(make_qwen2(), config(method), progress=False))
    device_model = copy.deepcopy(cpu_model).to(DEVICE)
    ids = ids_on("cpu")
    cpu_loss, cpu_logits, cpu_grads = loss_and_grads(cpu_model, ids)
    dev_loss, dev_logits, dev_grads = loss_and_grads(device_model, ids.to(DEVICE))
    assert rel_error(dev_logits, cpu_logits) < FP32_RTOL
    assert rel_error(dev_loss, cpu_loss) < FP32_RTOL
    assert dev_grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        assert dev_grads[name].device.type == torch.device(DEVICE).type
        assert rel_error(dev_grads[name], grad) < 1e-4, name


@pytest.mark.parametrize("method", ["dude", "dude_b", "pissa"])
@pytest.mark.parametrize("svd_niter", [None, 2])
def test_init_on_device_keeps_output_and_the_pretrained_view(method, svd_niter):
    """SVD and residual write on the device (exact and randomized SVD): the output at init is the
    pretrained model's, and so is the output with the adapter disabled."""
    base = decaying_spectrum_(make_llama()).to(DEVICE)
    ids = ids_on(DEVICE)
    with torch.no_grad():
        expected = base(ids).logits
    model = get_dude_model(base, config(method, svd_niter=svd_niter), progress=False)
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_A["default"].weight.device.type == torch.device(DEVICE).type
    with torch.no_grad():
        assert rel_error(model(ids).logits, expected) < FP32_RTOL
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        with model.disable_adapter():
            assert rel_error(model(ids).logits, expected) < FP32_RTOL


# --------------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dude", "dora", "lora"])
def test_bf16_step_matches_its_fp32_upcast_and_trains(method):
    """A bf16 base on the device: the adapter stays float32; the output at init is the bf16
    model's; one step's loss and gradients match the same model upcast to float32 on the CPU
    within bf16 rounding; 15 AdamW steps lower the loss with every value finite."""
    base = decaying_spectrum_(make_llama()).to(DEVICE, torch.bfloat16)
    ids = ids_on(DEVICE, batch=4, length=24, seed=1)
    with torch.no_grad():
        base_logits = base(ids).logits.float()
    model = get_dude_model(base, config(method), progress=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    with torch.no_grad():
        assert rel_error(model(ids).logits.float(), base_logits) < BF16_RTOL
        for p in trainable.values():  # away from init, so that every gradient is non-trivial
            p.add_(0.05 * torch.randn_like(p))
    reference = copy.deepcopy(model).to("cpu", torch.float32)
    loss, logits, grads = loss_and_grads(model, ids)
    ref_loss, ref_logits, ref_grads = loss_and_grads(reference, ids.cpu())
    assert rel_error(logits.float(), ref_logits) < BF16_RTOL
    assert rel_error(loss.float(), ref_loss) < 5e-3
    for name, grad in ref_grads.items():
        assert grads[name].dtype == torch.float32
        assert rel_error(grads[name], grad) < 5e-2, name
    losses = train(model, ids, steps=15)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses


# --------------------------------------------------------------------------------------------
# QDuDe on bitsandbytes' 4-bit kernels
# --------------------------------------------------------------------------------------------

needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")


def nf4(compute_dtype=torch.float32) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def qdude(model_dir: str, method: str = "dude", **kw):
    return get_dude_model(model_dir, config(method, **kw), quantization_config=nf4(), progress=False,
                          device_map={"": DEVICE})


@needs_bnb
@pytest.mark.parametrize("method", ["dude", "dude_b", "lora"])
def test_qdude_init_keeps_the_output_on_4bit_kernels(model_dir, float_model, method):
    """Loaded quantized onto the device: the forward through bitsandbytes' kernels equals the
    float model holding deq(W_res) + s*B@A, and that is closer to W0 than plain NF4."""
    model = qdude(model_dir, method)
    layer = next(iter(lora_layers(model).values()))
    assert type(layer.get_base_layer()).__name__ == "Linear4bit"
    assert layer.get_base_layer().weight.device.type == torch.device(DEVICE).type
    ref = reference_model(float_model, model)
    ids = ids_on(DEVICE)
    for train_mode in (False, True):
        model.train(train_mode)
        ref.train(train_mode)
        with torch.no_grad():
            assert rel_error(model(ids).logits, ref(ids).logits) < 1e-4
    if method != "lora":
        errors = init_errors(model, float_model)
        assert all(dude < plain for dude, plain in errors), errors


@needs_bnb
def test_qdude_trains_and_reloads_exactly_on_4bit_kernels(model_dir, tmp_path):
    """Training lowers the loss and leaves the quantized residual alone; save_pretrained and
    load_dude_model onto a fresh 4-bit base rebuild the very same packed residual and outputs."""
    model = qdude(model_dir, quant_iters=1)
    packed = {n: m.get_base_layer().weight.data.clone() for n, m in lora_layers(model).items()}
    ids = ids_on(DEVICE, batch=4, length=24, seed=1)
    losses = train(model, ids, steps=8)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight.data, packed[name]), name
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = load_dude_model(model_dir, tmp_path, quantization_config=nf4(), progress=False,
                               device_map={"": DEVICE})
    for name, layer in lora_layers(reloaded).items():
        assert torch.equal(layer.get_base_layer().weight.data, packed[name]), name
    with torch.no_grad():
        assert rel_error(reloaded(ids).logits, expected) < FP32_RTOL


@pytest.mark.parametrize("base", ["bf16", pytest.param("nf4", marks=needs_bnb)])
def test_norm_is_computed_once_per_layer_and_step_with_checkpointing(model_dir, monkeypatch, base):
    """The detached norm is the step's one extra pass over a layer: with gradient checkpointing
    (forward twice) and bf16 autocast, each layer computes it once per optimizer step, on a bf16
    and on a 4-bit base alike (a cache miss would cost a pass and, on 4-bit, a host sync per forward)."""
    import dude_trl.norms as norms

    if base == "bf16":
        model = get_dude_model(decaying_spectrum_(make_llama()).to(DEVICE, torch.bfloat16), config(), progress=False)
    else:
        model = get_dude_model(model_dir, config(), quantization_config=nf4(torch.bfloat16), progress=False,
                               device_map={"": DEVICE}, dtype=torch.bfloat16)
    calls = []
    compute = norms._compute_norms
    monkeypatch.setattr(norms, "_compute_norms", lambda modules, adapter: calls.extend(modules) or compute(modules, adapter))
    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = ids_on(DEVICE, batch=2, length=16)
    for _ in range(3):
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    layers = list(lora_layers(model).values())
    assert len(calls) == 3 * len(layers)
    assert {id(m) for m in calls} == {id(m) for m in layers}
