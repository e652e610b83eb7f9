"""Top-r SVD and the DuDe splits (DESIGN.md table)."""

import pytest
import torch

from dude_trl.svd import layer_seed, split_factors, top_r_svd


def _decaying(out: int = 48, inp: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
    V, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    S = 0.8 ** torch.arange(min(out, inp), dtype=torch.float32)
    return U[:, : len(S)] @ torch.diag(S) @ V[:, : len(S)].T


def test_exact_svd_is_best_rank_r_approximation():
    W = _decaying()
    svd = top_r_svd(W, 6)
    approx = svd.U @ torch.diag(svd.S) @ svd.Vh
    U, S, Vh = torch.linalg.svd(W)
    assert torch.allclose(svd.S, S[:6], atol=1e-6)
    # Eckart-Young: the residual's Frobenius norm is the norm of the dropped singular values.
    assert torch.linalg.norm(W - approx) == pytest.approx(torch.linalg.norm(S[6:]).item(), rel=1e-5)


def test_randomized_svd_close_to_exact_and_independent_of_global_rng():
    W = _decaying()
    exact = top_r_svd(W, 6)
    torch.manual_seed(1)
    a = top_r_svd(W, 6, niter=4, seed=7)
    torch.manual_seed(2)
    b = top_r_svd(W, 6, niter=4, seed=7)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)
    assert torch.allclose(a.S, exact.S, rtol=1e-4)
    c = top_r_svd(W, 6, niter=4, seed=8)
    assert not torch.equal(a.U, c.U)


@pytest.mark.parametrize("method", ["dude", "dude_a", "dude_b", "pissa"])
@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25])
def test_split_reproduces_principal_part(method, scaling):
    W = _decaying()
    svd = top_r_svd(W, 5)
    A, B = split_factors(svd, scaling, method)
    assert A.shape == (5, 40) and B.shape == (48, 5)
    assert torch.allclose(scaling * B @ A, svd.U @ torch.diag(svd.S) @ svd.Vh, atol=1e-5)


def test_split_follows_design_table():
    W = _decaying()
    svd = top_r_svd(W, 4)
    s = 2.0
    A, B = split_factors(svd, s, "dude")
    root = (svd.S / s).sqrt()
    assert torch.allclose(B, svd.U * root) and torch.allclose(A, root[:, None] * svd.Vh)
    A, B = split_factors(svd, s, "dude_a")
    assert torch.allclose(B, svd.U) and torch.allclose(A, (svd.S / s)[:, None] * svd.Vh)
    A, B = split_factors(svd, s, "dude_b")
    assert torch.allclose(B, svd.U * (svd.S / s)) and torch.allclose(A, svd.Vh)


def test_rank_too_large_and_unknown_method_raise():
    W = _decaying(10, 8)
    with pytest.raises(ValueError, match="min\\(out, in\\)=8"):
        top_r_svd(W, 9)
    with pytest.raises(ValueError, match="no SVD split"):
        split_factors(top_r_svd(W, 2), 1.0, "lora")


def test_layer_seed_depends_on_name_and_seed():
    assert layer_seed(0, "a") == layer_seed(0, "a")
    assert len({layer_seed(0, "a"), layer_seed(0, "b"), layer_seed(1, "a")}) == 3
