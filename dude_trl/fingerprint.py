"""Base fingerprints: a few numbers per layer that tell the base weight an adapter was trained on
from any other of the same shape.

A DuDe adapter only makes sense on its own base: its frozen residual is ``W0 - s B0 A0``, so the
same adapter on another model (or revision) with the same shapes would compute something else
without a word. Each DuDe layer therefore stores `fingerprint(W0)` (the `FINGERPRINT` buffer,
saved with the adapter), and a reload or resume checks the base against it.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from .layers import FINGERPRINT, store_buffer

_PROBES = 4
_SEED = 0xD0DE
# A probe ``u^T W v`` (u, v random signs) has standard deviation ||W||_F over random weights; a cast of the
# base to bf16/fp16, or the rounding in ``W_res + s B0 A0``, moves it by well under 1% of ||W||_F.
RTOL = 2e-2


def base_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """``[||W||_F, u_1^T W v_1, ..., u_k^T W v_k]`` (float32, on CPU) for fixed pseudo-random sign
    vectors u, v: a few numbers that tell one weight from another of the same shape.

    Over random weights each probe has standard deviation ``||W||_F``, so two different bases agree
    on all probes to `RTOL` with negligible probability, while a cast to bf16/fp16 moves them by
    far less. `weight` is ``out x in``.
    """
    W = weight.detach().float()
    out_features, in_features = W.shape
    generator = torch.Generator().manual_seed(_SEED)
    u = torch.randint(0, 2, (out_features, _PROBES), generator=generator).float().mul_(2).sub_(1)
    v = torch.randint(0, 2, (in_features, _PROBES), generator=generator).float().mul_(2).sub_(1)
    probes = ((W @ v.to(W.device)) * u.to(W.device)).sum(dim=0)
    return torch.cat([torch.linalg.vector_norm(W).reshape(1), probes]).cpu()


def store_fingerprint(module: LoraLayer, adapter_name: str, fingerprint: torch.Tensor) -> None:
    """Keep `fingerprint` as the layer's `FINGERPRINT` buffer (saved with the adapter)."""
    device = module.lora_A[adapter_name].weight.device
    store_buffer(module, FINGERPRINT, adapter_name, fingerprint.detach().float().to(device))


def check_fingerprint(layer_name: str, expected: torch.Tensor, actual: torch.Tensor, base_hint: str) -> None:
    """Raise a `ValueError` naming the layer and the base to use when `actual` (this base's
    fingerprint) differs from `expected` (the adapter's) by more than `RTOL` of ``||W0||_F``."""
    expected, actual = expected.float().cpu(), actual.float().cpu()
    tolerance = RTOL * expected[0].abs().clamp_min(torch.finfo(torch.float32).tiny)
    if expected.shape != actual.shape or bool(((expected - actual).abs() > tolerance).any()):
        raise ValueError(
            f"The base weight of {layer_name!r} is not the one this adapter was trained on (fingerprint "
            f"{[round(x, 4) for x in expected.tolist()]}, this base gives {[round(x, 4) for x in actual.tolist()]}). "
            f"Load the adapter onto its own base model{base_hint}: another model or revision with the same shapes "
            f"would silently compute something else."
        )
