"""Top-r SVD of a weight and its split into LoRA factors (DESIGN.md, "The method").

All functions take and return the PyTorch layout ``out x in`` and work in float32 on the
device of their input, so a GPU does the decomposition when the weight lives there.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Optional

import torch


class TopSVD(NamedTuple):
    """The top-r singular triplets ``W ~= U diag(S) Vh`` (U: out x r, S: r, Vh: r x in)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def layer_seed(base_seed: int, layer_name: str) -> int:
    """A 63-bit seed mixing `base_seed` and `layer_name`: each layer gets its own random
    stream, identical on every process and independent of the global RNG state."""
    digest = hashlib.sha256(f"{base_seed}:{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def top_r_svd(
    weight: torch.Tensor,
    r: int,
    niter: Optional[int] = None,
    *,
    oversample: int = 8,
    seed: int = 0,
) -> TopSVD:
    """Top-`r` singular triplets of `weight` (computed in float32).

    `niter=None` runs an exact SVD. An integer runs a randomized range finder
    (Halko, Martinsson & Tropp 2011) with `niter` power iterations and `oversample`
    extra directions, drawn from a generator seeded with `seed`, so the result does not
    depend on the global RNG.
    """
    out_features, in_features = weight.shape
    if not 0 < r <= min(out_features, in_features):
        raise ValueError(
            f"rank r={r} is not in [1, min(out, in)={min(out_features, in_features)}] for a "
            f"{out_features}x{in_features} weight; lower `r` (or its `rank_pattern` entry)."
        )
    W = weight.detach().to(torch.float32)
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return TopSVD(U[:, :r], S[:r], Vh[:r])

    q = min(r + oversample, out_features, in_features)
    # The sketch is drawn on the CPU so a layer gets the same factors whatever device decomposes it.
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(in_features, q, generator=generator, dtype=W.dtype).to(W.device)
    Q, _ = torch.linalg.qr(W @ omega)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(W.T @ Q)
        Q, _ = torch.linalg.qr(W @ Z)
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return TopSVD((Q @ Ub)[:, :r], S[:r], Vh[:r])


def split_factors(svd: TopSVD, scaling: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the top-r SVD into ``(A, B)`` (A: r x in, B: out x r) with
    ``scaling * B @ A == U diag(S) Vh`` for every method (DESIGN.md table)."""
    U, S, Vh = svd
    s_over = S / scaling
    if method in ("dude", "pissa"):
        root = s_over.sqrt()
        return root[:, None] * Vh, U * root[None, :]
    if method == "dude_a":
        return s_over[:, None] * Vh, U.clone()
    if method == "dude_b":
        return Vh.clone(), U * s_over[None, :]
    raise ValueError(f"method {method!r} has no SVD split; expected one of dude, dude_a, dude_b, pissa.")
