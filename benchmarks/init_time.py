"""DuDe initialisation time for every q_proj/v_proj of a 7B-shaped model: exact vs randomized SVD.

The target layers (only those: the rest of the model does not take part in the init) are
built with random bf16 weights whose spectrum decays like a pretrained weight's (a power law
plus noise), on the GPU when one is present. Three measurements:

1. end-to-end `get_dude_model` with the randomized SVD (``svd_niter``) over all layers
   (its own progress bar): SVD, split, residual write, magnitude reset;
2. the exact SVD (``svd_niter=None``) end to end as well, over all layers, or, with
   ``--exact-layers N``, over N layers of each distinct shape, extrapolated to the full count
   (labelled as such: on a CPU a full exact run of a 7B model takes tens of minutes);
3. accuracy of the randomized factors on the exactly decomposed layers: the rank-r
   approximation error relative to the exact top-r SVD's (1.0 = optimal).

    python benchmarks/init_time.py                          # Qwen2-7B shapes, all layers
    python benchmarks/init_time.py --exact-layers 1 --threads 2
    python benchmarks/init_time.py --model llama2-7b --niter 2,4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from dude_trl import DuDeConfig, get_dude_model
from dude_trl.svd import top_r_svd

#: (layers, {target: (out, in)}) of the 7B models people fine-tune.
SHAPES = {
    "qwen2-7b": (28, {"q_proj": (3584, 3584), "v_proj": (512, 3584)}),
    "llama2-7b": (32, {"q_proj": (4096, 4096), "v_proj": (4096, 4096)}),
    "tiny": (2, {"q_proj": (64, 64), "v_proj": (32, 64)}),  # smoke run
}


def spectral_weight(out_f: int, in_f: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """A weight whose singular values decay as a power law over a noise floor (like trained
    LLM weights; a plain Gaussian matrix has a flat spectrum no low-rank method fits)."""
    k = min(256, out_f, in_f)
    decay = torch.arange(1, k + 1, device=device, dtype=torch.float32).pow(-0.7)
    left = torch.randn(out_f, k, generator=generator, device=device) * decay
    right = torch.randn(k, in_f, generator=generator, device=device)
    noise = torch.randn(out_f, in_f, generator=generator, device=device) * (0.05 / in_f**0.5)
    return (left @ right / (k * in_f) ** 0.5 + noise).to(torch.bfloat16)


class Targets(nn.Module):
    """``model.layers.{i}.self_attn.{q_proj,v_proj}`` and nothing else."""

    def __init__(self, n_layers: int, shapes: dict, device: str, seed: int = 0):
        super().__init__()
        generator = torch.Generator(device=device).manual_seed(seed)
        self.layers = nn.ModuleList()
        for _ in tqdm(range(n_layers), desc="building weights", leave=False):
            attn = nn.Module()
            for name, (out_f, in_f) in shapes.items():
                linear = nn.Linear(in_f, out_f, bias=False, device="meta")
                linear.weight = nn.Parameter(spectral_weight(out_f, in_f, generator, device), requires_grad=False)
                setattr(attn, name, linear)
            layer = nn.Module()
            layer.self_attn = attn
            self.layers.append(layer)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_init(model: nn.Module, r: int, niter, device: str) -> float:
    config = DuDeConfig(r=r, lora_alpha=r, target_modules=["q_proj", "v_proj"], svd_niter=niter)
    sync(device)
    t0 = time.perf_counter()
    get_dude_model(model, config, progress=True)
    sync(device)
    return time.perf_counter() - t0


def rank_r_error(W: torch.Tensor, svd) -> float:
    U, S, Vh = svd
    return torch.linalg.matrix_norm(W - (U * S) @ Vh).item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-7b", choices=sorted(SHAPES))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--niter", default="2", help="power iterations of the randomized SVD, comma separated")
    parser.add_argument("--exact-layers", type=int, default=None,
                        help="exact SVD on this many layers per shape, extrapolated (default: all on GPU, 1 on CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    n_layers, shapes = SHAPES[args.model]
    total = n_layers * len(shapes)
    exact_layers = args.exact_layers if args.exact_layers is not None else (n_layers if device == "cuda" else 1)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"# init_time: {args.model} q/v ({total} layers: "
          + ", ".join(f"{k} {o}x{i}" for k, (o, i) in shapes.items())
          + f"), r={args.r}, bf16 weights, {where}, load avg {os.getloadavg()[0]:.1f}")
    # Warm-up: imports, lazy linear-algebra initialisation and first-call costs out of the timings.
    for niter in (None, 1):
        get_dude_model(Targets(1, {"q_proj": (64, 64)}, device), DuDeConfig(r=4, target_modules=["q_proj"], svd_niter=niter), progress=False)
    results: dict = {"model": args.model, "device": where, "r": args.r, "layers": total, "argv": sys.argv[1:]}

    for niter in [int(v) for v in args.niter.split(",")]:
        seconds = timed_init(Targets(n_layers, shapes, device), args.r, niter, device)
        results[f"randomized_niter{niter}_s"] = seconds
        print(f"randomized SVD (svd_niter={niter}), all {total} layers, end to end: {seconds:.1f} s "
              f"({seconds / total * 1e3:.0f} ms/layer)", flush=True)

    seconds = timed_init(Targets(exact_layers, shapes, device), args.r, None, device)
    per_layer = seconds / (exact_layers * len(shapes))
    label = "measured" if exact_layers == n_layers else f"extrapolated from {exact_layers} layer(s) per shape"
    results["exact_s"] = per_layer * total
    results["exact_measured_layers"] = exact_layers * len(shapes)
    print(f"exact SVD, {exact_layers * len(shapes)} layers end to end: {seconds:.1f} s -> all {total} layers: "
          f"{per_layer * total:.1f} s ({label})", flush=True)

    # Accuracy of the randomized SVD against the exact one, per shape.
    generator = torch.Generator(device=device).manual_seed(1)
    errors = defaultdict(dict)
    for name, (out_f, in_f) in shapes.items():
        W = spectral_weight(out_f, in_f, generator, device).float()
        exact = top_r_svd(W, args.r, None)
        best = rank_r_error(W, exact)
        for niter in [int(v) for v in args.niter.split(",")]:
            ratio = rank_r_error(W, top_r_svd(W, args.r, niter, seed=0)) / best
            errors[name][niter] = ratio
            print(f"{name} {out_f}x{in_f}: rank-{args.r} error of randomized (svd_niter={niter}) / exact = {ratio:.5f}")
    results["randomized_error_ratio"] = errors
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
