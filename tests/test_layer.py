"""The fast DuDe forward (dude_trl/variant.py) and its row norm (dude_trl/norms.py): the
expanded norm, its per-step cache and batching, the fused row scaling, dropout, merge/unmerge
and equivalence with PEFT's DoRA.

The reference everywhere is the direct formula on the full matrix,
``y = m / ||W + s B A||_row * (W x + s B A dropout(x)) + bias`` with the norm detached.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2LMHeadModel

import dude_trl.norms as norms_mod
from conftest import make_qwen2
from dude_trl import DuDeConfig, get_dude_model
from dude_trl.norms import dude_weight_norm, invalidate_norm_caches
from dude_trl.variant import DuDeLinearVariant

ADAPTER = "default"


class TwoLayer(nn.Module):
    """Two adapted projections with a nonlinearity between them, so input gradients matter."""

    def __init__(self, in_features=48, hidden=40, out_features=24, bias=True, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(in_features, hidden, bias=bias, dtype=dtype)
        self.down = nn.Linear(hidden, out_features, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _dude(base: nn.Module, method="dude", r=4, alpha=8, dropout=0.0, **kw):
    config = DuDeConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"], method=method, lora_dropout=dropout, **kw)
    return get_dude_model(base, config, progress=False)


def _layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_variant") and ADAPTER in m.lora_variant]


def _perturb_(model, seed=1, scale=0.2):
    """Move A, B and m away from their initial values, as training would (in place, tracked)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(model):
            for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.lora_magnitude_vector[ADAPTER].weight):
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g).to(p.dtype))


def _dense(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, s*B@A) in float64, ``out x in`` layout."""
    W = layer.get_base_layer().weight.detach().double()
    W = W.T if layer.fan_in_fan_out else W
    delta = layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight.double() @ layer.lora_A[ADAPTER].weight.double()
    return W, delta


def _direct_norm(layer) -> torch.Tensor:
    W, delta = _dense(layer)
    return torch.linalg.vector_norm(W + delta.detach(), dim=1)


def _direct_forward(layer, x, dropped=None):
    """The direct formula, differentiable in A, B, m and x (float32)."""
    base = layer.get_base_layer()
    W = base.weight.T if layer.fan_in_fan_out else base.weight
    A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    s, m = layer.scaling[ADAPTER], layer.lora_magnitude_vector[ADAPTER].weight
    norm = torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach()
    dropped = x if dropped is None else dropped
    y = (m / norm) * (x @ W.T + s * (dropped @ A.T @ B.T))
    return y if base.bias is None else y + base.bias


def _x(n=(3, 5), features=48, seed=0, dtype=torch.float32):
    return torch.randn(*n, features, generator=torch.Generator().manual_seed(seed), dtype=dtype, requires_grad=True)


# ---------------------------------------------------------------- the expanded row norm


@pytest.mark.parametrize("bias", [True, False])
def test_fast_norm_matches_direct_fp32(bias):
    model = _dude(TwoLayer(bias=bias))
    _perturb_(model)
    for layer in _layers(model):
        torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), _direct_norm(layer), rtol=2e-6, atol=0)


def test_norm_stays_float32_under_autocast():
    """A norm first computed inside a bf16 autocast region (a `bf16=True` Trainer) is as exact
    as one computed outside it: autocast would run the expansion's matmuls in bf16."""
    model = _dude(TwoLayer())
    _perturb_(model)
    for layer in _layers(model):
        invalidate_norm_caches(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm = dude_weight_norm(layer, ADAPTER)
        torch.testing.assert_close(norm.double(), _direct_norm(layer), rtol=2e-6, atol=0)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_fast_norm_matches_direct_bf16_base(monkeypatch, adapter_dtype):
    """bf16 residual (PEFT keeps the adapters in fp32 by default). The expansion upcasts W to
    fp32 in row chunks (forced small here), so it stays within fp32 rounding of the exact
    norm of the stored bf16 numbers: relative 1e-5."""
    monkeypatch.setattr(norms_mod, "_CHUNK_ELEMENTS", 48 * 7)  # several chunks, a ragged last one
    model = _dude(TwoLayer(dtype=torch.bfloat16))
    for layer in _layers(model):
        layer.lora_A.to(adapter_dtype), layer.lora_B.to(adapter_dtype)
    layer = model.base_model.model.up
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert layer.lora_A[ADAPTER].weight.dtype == adapter_dtype
    _perturb_(model)
    for layer in _layers(model):
        torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), _direct_norm(layer), rtol=1e-5, atol=0)


def test_cancellation_guard_recomputes_short_rows(monkeypatch):
    """Rows of W equal to -s(BA)_row plus a tiny remainder: the expansion subtracts nearly
    equal numbers (relative errors of 1e-2 here); the guard recomputes those rows directly."""
    model = _dude(TwoLayer(bias=False))
    layer = model.base_model.model.up
    _perturb_(model)
    _, delta = _dense(layer)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        weight = layer.get_base_layer().weight
        for row in range(3, 9):
            weight[row] = (-delta[row] + 1e-4 * torch.randn(delta.shape[1], dtype=torch.float64, generator=g)).float()
        weight[12] = 0.0
        layer.lora_B[ADAPTER].weight[12] = 0.0  # an all-zero row: the norm clamps, nothing is NaN
    expected = _direct_norm(layer)
    norm = dude_weight_norm(layer, ADAPTER).double()
    nonzero = expected > 0
    torch.testing.assert_close(norm[nonzero], expected[nonzero], rtol=1e-5, atol=0)
    assert norm[12] > 0 and torch.isfinite(norm).all()

    # Without the guard the same rows are far off: the check above would catch its removal.
    monkeypatch.setattr(norms_mod, "CANCELLATION_RATIO", 0.0)
    invalidate_norm_caches(model)
    unguarded = dude_weight_norm(layer, ADAPTER).double()
    assert ((unguarded[3:9] - expected[3:9]).abs() / expected[3:9]).max() > 1e-3

    x = _x(features=48)
    out = model(x)
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_quantized_base_norm_without_dequantizing_per_step(tmp_path, monkeypatch):
    """4-bit base: ``W A^T`` comes from the bnb layer run on the rows of A; the full weight is
    dequantized once (for the constant ``||W_i||^2``), not at every optimizer step."""
    pytest.importorskip("bitsandbytes")
    from peft.utils.integrations import dequantize_module_weight
    from transformers import BitsAndBytesConfig

    make_qwen2().save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    model = get_dude_model(str(tmp_path), config, quantization_config=quant, progress=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.get_base_layer()).__module__.startswith("bitsandbytes")
    dequantized = []
    monkeypatch.setattr(norms_mod, "dequantize_module_weight", lambda m: dequantized.append(m) or dequantize_module_weight(m))
    for step in range(3):
        with torch.no_grad():
            layer.lora_B[ADAPTER].weight.mul_(1.3)
        W = dequantize_module_weight(layer.get_base_layer()).double()
        delta = layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight.double() @ layer.lora_A[ADAPTER].weight.double()
        expected = torch.linalg.vector_norm(W + delta, dim=1)
        torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), expected, rtol=1e-5, atol=0)
    assert len(dequantized) == 1


# ---------------------------------------------------------------- forward and gradients


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_direct_formula(bias):
    """Gradients of x, A, B, m and, with `bias="all"`, of the trainable base bias."""
    model = _dude(TwoLayer(bias=bias), bias="all" if bias else "none")
    _perturb_(model)
    model.train()
    layer = model.base_model.model.up
    if bias:
        assert layer.get_base_layer().bias.requires_grad
    x = _x()
    ours = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = _direct_forward(layer, x_ref)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # inference takes its own path (no tensor saved for the magnitude gradient)
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=0)

    g = torch.randn_like(ours)
    params = [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.lora_magnitude_vector[ADAPTER].weight]
    params += [layer.get_base_layer().bias] if bias else []
    got = torch.autograd.grad(ours, [x, *params], g)
    want = torch.autograd.grad(ref, [x_ref, *params], g)
    for name, a, b in zip(["x", "A", "B", "m", "bias"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_base_fp32_adapters_forward_close_to_direct():
    """Mixed precision as PEFT sets it up: bf16 base output, fp32 adapters. The output is bf16
    (rounded once) and gradients reach A, B, m in fp32."""
    model = _dude(TwoLayer(dtype=torch.bfloat16))
    _perturb_(model)
    model.train()
    layer = model.base_model.model.up
    x = _x(dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = _direct_forward_fp64(layer, x.detach())
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-2
    out.float().square().sum().backward()
    for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.lora_magnitude_vector[ADAPTER].weight):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert x.grad.dtype == torch.bfloat16


def test_autocast_bf16_and_frozen_input():
    """Under `torch.autocast` (fp32 weights, bf16 compute) the base and lora_A outputs arrive in
    bf16 and the adapter weights in fp32; with an input that needs no gradient, only A, B and m
    get one."""
    model = _dude(TwoLayer())
    _perturb_(model)
    model.train()
    layer = model.base_model.model.up
    x = _x().detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    ref = _direct_forward_fp64(layer, x)
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 2e-2
    out.float().square().sum().backward()
    for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.lora_magnitude_vector[ADAPTER].weight):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    grads = [p.grad.clone() for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
    model.zero_grad()
    _direct_forward(layer, x).square().sum().backward()
    for got, p in zip(grads, (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)):
        assert torch.nn.functional.cosine_similarity(got.flatten(), p.grad.flatten(), dim=0) > 0.99


def _direct_forward_fp64(layer, x):
    W, delta = _dense(layer)
    m = layer.lora_magnitude_vector[ADAPTER].weight.double()
    y = (m / torch.linalg.vector_norm(W + delta, dim=1)) * (x.double() @ (W + delta).T)
    bias = layer.get_base_layer().bias
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_base_layer_runs_once_per_forward(dropout):
    """The base output is reused: no second base matmul, also with dropout (PEFT's DoRA reruns
    the base layer on the dropped-out input)."""
    model = _dude(TwoLayer(), dropout=dropout)
    model.train()
    layer = model.base_model.model.up
    calls = []
    layer.get_base_layer().register_forward_hook(lambda *args: calls.append(1))
    layer(_x()).sum().backward()
    assert len(calls) == 1


def test_saves_one_output_sized_tensor_for_backward():
    """Activation memory: DuDe keeps what LoRA keeps plus one ``tokens x out`` tensor in the base
    output's dtype (bf16 here), not a float32 copy and not PEFT DoRA's extra tensors."""

    def saved_bytes(model, x):
        storages = {}

        def pack(t):
            if t.numel() >= 1000:  # ignore per-row vectors
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())

    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(64, 96, dtype=torch.bfloat16))
    x = torch.randn(4, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["proj"]))
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["proj"], use_dora=True))
    dude = get_dude_model(copy.deepcopy(base), DuDeConfig(r=8, target_modules=["proj"]), progress=False)
    out_bf16 = 4 * 32 * 96 * 2
    lora_bytes, dora_bytes, dude_bytes = saved_bytes(lora, x), saved_bytes(dora, x), saved_bytes(dude, x)
    assert dude_bytes == lora_bytes + out_bf16
    assert dora_bytes > dude_bytes


# ---------------------------------------------------------------- the per-step cache


def _count_computations(monkeypatch) -> list:
    calls = []
    original = norms_mod._compute_norms

    def counting(modules, adapter):
        calls.extend(modules)
        return original(modules, adapter)

    monkeypatch.setattr(norms_mod, "_compute_norms", counting)
    return calls


def _train(model, steps, accumulation, use_checkpoint=None, lr=5e-2):
    """Adam steps over `accumulation` micro-batches each; returns the trainable parameters."""
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        for micro in range(accumulation):
            x = _x(seed=100 * step + micro)
            out = model(x) if use_checkpoint is None else checkpoint(model, x, use_reentrant=use_checkpoint)
            out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_checkpoint", [None, True, False], ids=["plain", "reentrant", "non_reentrant"])
def test_cache_gives_identical_training_and_one_norm_per_step(monkeypatch, use_checkpoint):
    """With and without the cache, 3 optimizer steps of 4 accumulated micro-batches (optionally
    under gradient checkpointing) give bit-identical parameters; with the cache each layer
    computes its norm once per optimizer step, not per micro-batch or recompute."""
    base = TwoLayer()
    cached_model = _dude(copy.deepcopy(base))
    uncached_model = copy.deepcopy(cached_model)
    calls = _count_computations(monkeypatch)
    cached = _train(cached_model, steps=3, accumulation=4, use_checkpoint=use_checkpoint)
    assert len(calls) == 3 * len(_layers(cached_model))

    monkeypatch.setattr(norms_mod, "CACHE_NORMS", False)
    uncached = _train(uncached_model, steps=3, accumulation=4, use_checkpoint=use_checkpoint)
    forwards = 2 if use_checkpoint is not None else 1
    assert len(calls) == 3 * len(_layers(cached_model)) * (1 + 4 * forwards)
    assert cached.keys() == uncached.keys()
    for name in cached:
        assert torch.equal(cached[name], uncached[name]), name


class Stack(nn.Module):
    """Four same-shape projections (as a transformer's q_proj in every layer), then a fifth of another shape."""

    def __init__(self, width=48, depth=4, dtype=torch.float32):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width, dtype=dtype) for _ in range(depth))
        self.head = nn.Linear(width, 24, dtype=dtype)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_shape_layers_share_one_norm_computation(monkeypatch, dtype):
    """A model's layers of one shape compute their norms in one batched call at the first of their
    forwards after an optimizer step; each equals the direct norm, the cancellation guard included
    (a short row in one layer of the batch), and the training equals the unbatched one bit for bit."""
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"])
    model = get_dude_model(Stack(dtype=dtype), config, progress=False)
    _perturb_(model)
    block = model.base_model.model.blocks[2]
    _, delta = _dense(block)
    with torch.no_grad():
        block.get_base_layer().weight[5] = (-0.97 * delta[5]).to(dtype)  # ratio about 5e-4: guarded
    unbatched = copy.deepcopy(model)
    calls = []
    original = norms_mod._compute_norms
    monkeypatch.setattr(norms_mod, "_compute_norms", lambda modules, adapter: calls.append(modules) or original(modules, adapter))
    model(_x(dtype=dtype))
    assert sorted(len(c) for c in calls) == [1, 4]  # the four blocks together, the head alone
    rtol = 1e-5
    for layer in _layers(model):
        torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), _direct_norm(layer), rtol=rtol, atol=0)
    assert len(calls) == 2  # the norms above were cached

    def train(m, batched):
        monkeypatch.setattr(norms_mod, "_batch_key", norms_mod._batch_key if batched else lambda *a: None)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            m(_x(seed=step, dtype=dtype)).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        return {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}

    batched_key = norms_mod._batch_key
    calls.clear()
    trained = train(model, batched=True)
    assert sorted(len(c) for c in calls) == [1, 1, 4, 4]  # the first step reuses the norms above
    monkeypatch.setattr(norms_mod, "_batch_key", batched_key)
    reference = train(unbatched, batched=False)
    for name, value in trained.items():
        assert torch.equal(value, reference[name]), name


def test_a_copy_batches_its_own_layers(monkeypatch):
    """TRL's reference model is a deep copy, and models get pickled: a copy's layers compute their
    norms among themselves (alone at first, together once each has joined), never with the
    original's; copying one layer does not copy the others."""
    import pickle

    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["blocks.0", "blocks.1", "blocks.2", "blocks.3"])
    model = get_dude_model(Stack(), config, progress=False)
    calls = []
    original = norms_mod._compute_norms
    monkeypatch.setattr(norms_mod, "_compute_norms", lambda modules, adapter: calls.append(modules) or original(modules, adapter))
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        calls.clear()
        copied(_x())
        assert [len(c) for c in calls] == [1, 1, 1, 1]
        norms_mod.invalidate_norm_caches(copied)
        copied(_x())
        assert len(calls) == 5 and {id(m) for m in calls[4]} == {id(m) for m in _layers(copied)}
    calls.clear()
    model(_x())
    assert len(calls) == 1 and {id(m) for m in calls[0]} == {id(m) for m in _layers(model)}
    layer = copy.deepcopy(model.base_model.model.blocks[0])
    assert layer.__dict__["_dude_norm_peers"][ADAPTER].modules == []


def test_cache_invalidated_by_optimizer_step_writing_through_data():
    """An optimizer that updates through `.data` bumps no version counter (as DeepSpeed's
    partition copy-back does); the global step hook still invalidates the norm."""

    class DataSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.data.add_(p.grad, alpha=-group["lr"])

    model = _dude(TwoLayer())
    layer = model.base_model.model.up
    model(_x()).square().sum().backward()
    before = dude_weight_norm(layer, ADAPTER).clone()
    DataSGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    after = dude_weight_norm(layer, ADAPTER)
    torch.testing.assert_close(after.double(), _direct_norm(layer), rtol=2e-6, atol=0)
    assert not torch.allclose(before, after)


def test_data_writes_need_invalidate_and_in_place_writes_do_not():
    model = _dude(TwoLayer())
    layer = model.base_model.model.up
    dude_weight_norm(layer, ADAPTER)
    B = layer.lora_B[ADAPTER].weight
    B.data.mul_(1.5)  # invisible to autograd's version counter
    stale = dude_weight_norm(layer, ADAPTER).double()
    assert not torch.allclose(stale, _direct_norm(layer))
    invalidate_norm_caches(model)
    torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), _direct_norm(layer), rtol=2e-6, atol=0)

    B.data.mul_(1.5)
    invalidate_norm_caches()  # no model: every layer in the process
    torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), _direct_norm(layer), rtol=2e-6, atol=0)

    with torch.no_grad():
        layer.lora_A[ADAPTER].weight.mul_(0.5)  # in place: version counter bumps
        layer.get_base_layer().weight.mul_(0.9)  # the residual too
    torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), _direct_norm(layer), rtol=2e-6, atol=0)
    layer.scaling[ADAPTER] = 3.0
    torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), _direct_norm(layer), rtol=2e-6, atol=0)


@pytest.mark.parametrize("assign", [False, True])
def test_cache_invalidated_by_load_state_dict(assign):
    model = _dude(TwoLayer())
    other = copy.deepcopy(model)
    _perturb_(other, seed=5)
    x = _x()
    model(x)  # fills the caches
    model.load_state_dict(other.state_dict(), assign=assign)
    torch.testing.assert_close(model(x), other(x), atol=0, rtol=0)


def test_cache_filled_under_inference_mode_is_usable_for_training():
    """Evaluation under `torch.inference_mode` (generation) between training steps must not
    leave an inference tensor in the cache that autograd then refuses to save."""
    model = _dude(TwoLayer())
    with torch.inference_mode():
        model(_x())
    model.train()
    model(_x()).square().sum().backward()
    assert model.base_model.model.up.lora_magnitude_vector[ADAPTER].weight.grad is not None


# ---------------------------------------------------------------- dropout


def test_dropout_applies_to_the_low_rank_branch_only_and_not_in_eval():
    model = _dude(TwoLayer(), dropout=0.5)
    _perturb_(model)
    layer = model.base_model.model.up
    x = _x()
    model.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, p=0.5, training=True)
    torch.testing.assert_close(out, _direct_forward(layer, x, dropped=dropped), atol=1e-5, rtol=0)
    assert not torch.allclose(out, _direct_forward(layer, x), atol=1e-3)

    model.eval()
    torch.testing.assert_close(layer(x), _direct_forward(layer, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_matches_forward_and_unmerge_restores_exactly(dtype, safe_merge):
    model = _dude(TwoLayer(dtype=dtype))
    _perturb_(model)
    model.eval()
    x = _x(dtype=dtype)
    expected = model(x).detach()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}

    for _ in range(2):  # repeated merge/unmerge cycles do not drift
        model.base_model.merge_adapter(safe_merge=safe_merge)
        merged_out = model(x).detach()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(merged_out.float(), expected.float(), atol=tol, rtol=tol)
        model.base_model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in weights:
                assert torch.equal(p, weights[n]), n
        assert torch.equal(model(x), expected)

    merged = copy.deepcopy(model).merge_and_unload(safe_merge=safe_merge)
    assert not any(isinstance(m, type(model.base_model.model.up)) for m in merged.modules())
    torch.testing.assert_close(merged(x).float(), expected.float(), atol=tol, rtol=tol)


def test_merge_uses_the_unmerged_norm_with_two_adapters():
    model = _dude(TwoLayer())
    config = DuDeConfig(r=2, lora_alpha=4, target_modules=["up", "down"], method="dora")
    model.add_adapter("second", config)
    for layer in _layers(model):
        layer.lora_variant["second"] = DuDeLinearVariant()
    _perturb_(model)
    model.eval()
    x = _x()
    model.base_model.set_adapter([ADAPTER, "second"])
    expected = model(x).detach()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    model.base_model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n


# ---------------------------------------------------------------- PEFT DoRA and Conv1D


def test_matches_peft_dora_pissa_after_training_steps():
    """Same outputs and gradients as PEFT's `LoraConfig(use_dora=True, init_lora_weights="pissa")`
    (exact SVD, no dropout), at init and after both took the same 3 Adam steps."""
    base = make_qwen2()
    ids = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    targets = ["q_proj", "v_proj"]
    ours = get_dude_model(copy.deepcopy(base), DuDeConfig(r=4, lora_alpha=8, target_modules=targets), progress=False)
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights="pissa")
    )
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert names == [n for n, p in theirs.named_parameters() if p.requires_grad]
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    ours.train(), theirs.train()
    for step in range(4):
        outs = [m(ids).logits for m in (ours, theirs)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0, msg=f"step {step}")
        for out in outs:
            out.square().mean().backward()
        grads = [dict((n, p.grad) for n, p in m.named_parameters() if p.requires_grad) for m in (ours, theirs)]
        for name in names:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=f"{name} step {step}")
        for opt in opts:
            opt.step()
            opt.zero_grad()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def test_conv1d_fan_in_fan_out():
    """GPT-2's Conv1D stores ``in x out``; the norm, forward, gradients and merge follow."""
    config = DuDeConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = get_dude_model(_gpt2(), config, progress=False)
    _perturb_(model)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.get_base_layer().weight.shape == (32, 96)
    torch.testing.assert_close(dude_weight_norm(layer, ADAPTER).double(), _direct_norm(layer), rtol=2e-6, atol=0)

    model.train()
    x = _x(features=32)
    ours = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = _direct_forward(layer, x_ref)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    g = torch.randn_like(ours)
    params = [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.lora_magnitude_vector[ADAPTER].weight]
    for a, b in zip(torch.autograd.grad(ours, [x, *params], g), torch.autograd.grad(ref, [x_ref, *params], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    model.eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits.detach()
    weight = layer.get_base_layer().weight.detach().clone()
    model.base_model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
    model.base_model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, weight)
    merged = copy.deepcopy(model).merge_and_unload()
    assert merged.transformer.h[0].attn.c_attn.weight.is_contiguous()
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- ZeRO-3 (2 processes)

ZERO3_SCRIPT = """\"\"\"ZeRO-3 (2 ranks, CPU/gloo): DuDe's cached norm vs an uncached single-process reference.\"\"\"
import copy, os, sys

sys.path.insert(0, sys.argv[1])  # tests/ (conftest helpers)
import torch
import deepspeed
import dude_trl.norms as norms_mod
from conftest import make_qwen2
from dude_trl import DuDeConfig, get_dude_model

deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
torch.manual_seed(0)
ref = get_dude_model(make_qwen2(), DuDeConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), progress=False)
model = copy.deepcopy(ref)
for m in (ref, model):
    m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    m.base_model.model.enable_input_require_grads()
batches = [torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]
config = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
                          "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
}
trainable = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
ref.train(), engine.train()
computations = []
original = norms_mod._compute_norms
norms_mod._compute_norms = lambda modules, adapter: (computations.extend(modules), original(modules, adapter))[1]
for step in range(4):
    if step == 1 and rank == 0:
        norms_mod.invalidate_norm_caches(model)  # a miss on one rank only must not deadlock
    if step == 2:  # the frozen residual rewritten through .data under ZeRO-3, then an explicit invalidation
        for net in (ref, engine.module):
            W = net.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
            with deepspeed.zero.GatheredParameters([W], modifier_rank=0, enabled=hasattr(W, "ds_id")):
                W.data.mul_(0.5)
        norms_mod.invalidate_norm_caches()
    norms_mod.CACHE_NORMS = False
    ref_losses = []
    for ids in batches:
        loss = ref(ids, labels=ids).loss
        (loss / 2).backward()
        ref_losses.append(loss.item())
    ref_opt.step()
    ref_opt.zero_grad()
    norms_mod.CACHE_NORMS = True
    before = len(computations)
    losses = []
    for ids in batches:
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    per_step = len(computations) - before
    print(f"rank {rank} step {step} ref {ref_losses} zero3 {losses} norm computations {per_step}", flush=True)
    assert all(abs(a - b) < 1e-5 for a, b in zip(ref_losses, losses)), (ref_losses, losses)
    assert per_step == 4, per_step  # 2 layers x (q, v), once per optimizer step
print(f"rank {rank} OK", flush=True)
"""


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_cached_norm_matches_uncached_reference(tmp_path):
    """ZeRO-3 on 2 CPU processes (gloo), parameters released after every use, 2 accumulated
    micro-batches per step, reentrant checkpointing: losses equal an uncached single-process
    reference for 4 steps; one norm per layer per step; a miss on one rank only (rank-local
    invalidation) does not hang; a residual rewritten through `.data` plus
    `invalidate_norm_caches()` is picked up."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero3_norm_cache.py"
    script.write_text(ZERO3_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), str(script), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" OK") == 2
