"""Top-r SVD of a weight, its split into LoRA factors (DESIGN.md, "The method"), and the fit of
those factors to a base that stores its residual lossily (a quantized base).

All functions take and return the PyTorch layout ``out x in`` and work in float32 on the
device of their input, so a GPU does the decomposition when the weight lives there.
"""

from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple, Optional

import torch

from .methods import METHOD_TABLE, get_method


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
    ``scaling * B @ A == U diag(S) Vh``, as the method table says for `method`."""
    U, S, Vh = svd
    split = get_method(method).split
    s_over = S / scaling
    if split == "sqrt":
        root = s_over.sqrt()
        return root[:, None] * Vh, U * root[None, :]
    if split == "A":
        return s_over[:, None] * Vh, U.clone()
    if split == "B":
        return Vh.clone(), U * s_over[None, :]
    svd_methods = ", ".join(name for name, row in METHOD_TABLE.items() if row.uses_svd_init)
    raise ValueError(f"method {method!r} has no SVD split; expected one of {svd_methods}.")


class FittedFactors(NamedTuple):
    """A, B (float32) whose residual ``W0 - s*B@A`` is what the base stores.

    ``error`` is ``||W0 - (stored(W_res) + s*B@A)||_F`` for these A, B (0.0 when the base stores
    the residual exactly); ``round`` is the refinement round they come from (0: SVD of W0).
    """

    A: torch.Tensor
    B: torch.Tensor
    error: float
    round: int


def fit_factors(
    W0: torch.Tensor,
    r: int,
    scaling: float,
    method: str,
    roundtrip: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    *,
    quant_iters: int = 0,
    svd_niter: Optional[int] = None,
    svd_oversample: int = 8,
    seed: int = 0,
) -> FittedFactors:
    """Top-r factors of `W0` for a base that stores the residual as ``roundtrip(W_res)``.

    Without `roundtrip` (an exact store) this is the `method` split of the SVD of W0. With one
    (e.g. quantize then dequantize), each of `quant_iters` refinement rounds re-fits A, B to
    what the previous residual's round trip lost, ``A, B <- split(SVD_r(W0 - roundtrip(W_res)))``
    (LoftQ / QPiSSA alternation), and the round with the lowest error is kept, so more rounds
    never increase the error. The returned A, B are always paired with the residual that gets stored.
    """
    W0 = W0.detach().float()

    def fit(target: torch.Tensor, round_: int) -> tuple[FittedFactors, Optional[torch.Tensor]]:
        svd = top_r_svd(target, r, svd_niter, oversample=svd_oversample, seed=seed)
        A, B = split_factors(svd, scaling, method)
        if roundtrip is None:
            return FittedFactors(A, B, 0.0, round_), None
        residual = W0 - scaling * (B @ A)
        stored = roundtrip(residual)
        error = torch.linalg.matrix_norm(residual - stored).item()
        return FittedFactors(A, B, error, round_), stored

    best, stored = fit(W0, 0)
    if roundtrip is None:
        return best
    for round_ in range(1, quant_iters + 1):
        candidate, stored = fit(W0 - stored, round_)
        if candidate.error < best.error:
            best = candidate
    return best
