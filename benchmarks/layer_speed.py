"""Layer-level speed and memory: DuDe vs PEFT LoRA vs PEFT DoRA on one adapted linear layer.

One timed unit is an optimizer step: `--accum` micro-batches of forward + backward (the input
requires grad, as inside a model) followed by an AdamW step, so the per-step norm
computation DuDe caches is included. Methods are interleaved (rotated order every repetition)
and the median over repetitions is reported, with time and peak-memory ratios against LoRA
and DoRA. Saved memory: bytes of activations kept for backward by one micro-batch (what a
model accumulates over its layers). Peak memory: on CUDA the allocator's peak above the memory held before the step;
on CPU the peak of the profiler's memory timeline over one micro-batch (fwd + bwd).

Shapes are ``IN x OUT`` as in ``nn.Linear(IN, OUT)``. CPU runs float32; CUDA runs a bf16 base
with float32 adapters (PEFT's default `autocast_adapter_dtype`).

    python benchmarks/layer_speed.py --quick                  # the target config, CPU
    python benchmarks/layer_speed.py                          # full grid
    python benchmarks/layer_speed.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from dude_trl import DuDeConfig, get_dude_model

METHODS = ("lora", "dora", "dude")


class OneLayer(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: str):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(method: str, base: nn.Module, r: int) -> nn.Module:
    """The base wrapped by PEFT LoRA, PEFT DoRA, or DuDe (SVD init; randomized to keep setup short:
    the forward's cost does not depend on the values)."""
    base = copy.deepcopy(base)
    if method == "lora":
        return get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]))
    if method == "dora":
        return get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], use_dora=True))
    if method == "dude":
        return get_dude_model(base, DuDeConfig(r=r, lora_alpha=r, target_modules=["proj"], svd_niter=2), progress=False)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def optimizer_step(model, opt, x, grad, accum: int) -> None:
    for _ in range(accum):
        model(x).backward(grad)
        x.grad = None
    opt.step()
    opt.zero_grad(set_to_none=True)


def cpu_peak_bytes(fn) -> int:
    """Peak bytes allocated during `fn` (profiler memory timeline, CPU)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0] if totals else 0


def saved_bytes(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Bytes of activations one micro-batch keeps for backward (parameters excluded, shared
    storages counted once): what grows with depth and tokens in a full model."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.backward(grad)
    x.grad = None
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


@dataclass
class Row:
    shape: str
    r: int
    tokens: int
    accum: int
    method: str
    median_s: float
    peak_mib: float
    saved_mib: float
    time_vs_lora: float = 0.0
    time_vs_dora: float = 0.0
    mem_vs_lora: float = 0.0
    mem_vs_dora: float = 0.0


def run_config(in_f, out_f, r, tokens, accum, args, device, dtype) -> list[Row]:
    torch.manual_seed(0)
    base = OneLayer(in_f, out_f, args.bias, dtype, device)
    models = {m: build(m, base, r) for m in args.methods}
    opts = {
        m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        for m, model in models.items()
    }
    for model in models.values():
        model.train()
    x = torch.randn(tokens, in_f, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(tokens, out_f, dtype=dtype, device=device)

    peaks, saved = {}, {}
    for m, model in models.items():
        saved[m] = saved_bytes(model, x, grad)
        optimizer_step(model, opts[m], x, grad, accum)  # warm-up (allocator, lazy init)
        if device == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            optimizer_step(model, opts[m], x, grad, accum)
            sync(device)
            peaks[m] = torch.cuda.max_memory_allocated() - held
        else:
            peaks[m] = cpu_peak_bytes(lambda: optimizer_step(model, opts[m], x, grad, 1))

    times = {m: [] for m in models}
    for rep in range(args.reps):
        order = list(models)[rep % len(models):] + list(models)[: rep % len(models)]
        for m in order:
            sync(device)
            t0 = time.perf_counter()
            optimizer_step(models[m], opts[m], x, grad, accum)
            sync(device)
            times[m].append(time.perf_counter() - t0)

    rows = []
    med = {m: statistics.median(v) for m, v in times.items()}
    for m in models:
        row = Row(f"{in_f}x{out_f}", r, tokens, accum, m, med[m], peaks[m] / 2**20, saved[m] / 2**20)
        if "lora" in med:
            row.time_vs_lora = med[m] / med["lora"]
            row.mem_vs_lora = peaks[m] / max(peaks["lora"], 1)
        if "dora" in med:
            row.time_vs_dora = med[m] / med["dora"]
            row.mem_vs_dora = peaks[m] / max(peaks["dora"], 1)
        rows.append(row)
    return rows


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        in_f, out_f = item.lower().split("x")
        shapes.append((int(in_f), int(out_f)))
    return shapes


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shapes", default="2048x2048,4096x4096,4096x1024", help="IN x OUT, comma separated")
    parser.add_argument("--ranks", default="8,16,64")
    parser.add_argument("--tokens", default="512,4096")
    parser.add_argument("--accum", default="1,8", help="micro-batches per optimizer step")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (fixed for stable ratios)")
    parser.add_argument("--bias", action="store_true", help="base layer with a bias (Qwen2 q/k/v)")
    parser.add_argument("--quick", action="store_true", help="only 2048x2048, r=16, 512 tokens (the target config)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.ranks, args.tokens = "2048x2048", "16", "512"
    args.methods = [m for m in args.methods.split(",") if m]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    grid = list(
        itertools.product(
            parse_shapes(args.shapes),
            [int(v) for v in args.ranks.split(",")],
            [int(v) for v in args.tokens.split(",")],
            [int(v) for v in args.accum.split(",")],
        )
    )
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"# layer_speed on {where}, {dtype}, {args.reps} interleaved reps, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'shape':>10} {'r':>3} {'tokens':>6} {'acc':>3} {'method':>6} {'median ms':>10} {'peak MiB':>9} {'saved MiB':>9} "
          f"{'t/LoRA':>7} {'t/DoRA':>7} {'m/LoRA':>7} {'m/DoRA':>7}")
    rows = []
    for (in_f, out_f), r, tokens, accum in grid:
        for row in run_config(in_f, out_f, r, tokens, accum, args, device, dtype):
            rows.append(row)
            print(f"{row.shape:>10} {row.r:>3} {row.tokens:>6} {row.accum:>3} {row.method:>6} "
                  f"{row.median_s * 1e3:>10.2f} {row.peak_mib:>9.1f} {row.saved_mib:>9.1f} {row.time_vs_lora:>7.3f} "
                  f"{row.time_vs_dora:>7.3f} {row.mem_vs_lora:>7.3f} {row.mem_vs_dora:>7.3f}", flush=True)
    if args.json:
        meta = {"device": where, "dtype": str(dtype), "reps": args.reps, "argv": sys.argv[1:]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
