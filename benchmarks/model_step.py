"""Model-level training step time and peak memory: PEFT LoRA vs PEFT DoRA vs DuDe, and QLoRA vs
QDuDe on a bitsandbytes 4-bit base, on a 7B-shaped Qwen2 built from its config with random
weights (no download), q_proj/v_proj adapted.

One optimizer step = forward + backward on ``--tokens`` tokens (one sequence) + AdamW step.
Every round wraps the same base model with each method in turn (rotated order), runs warm-up
steps, times ``--steps`` steps, records the allocator's peak, and unloads the adapter again;
the median over rounds is reported with ratios against LoRA (QLoRA for the 4-bit rows).
Gradient checkpointing is measured off and on (non-reentrant). On CUDA the steps run under
bf16 autocast, as `Trainer(bf16=True)` runs them (the adapters stay float32, PEFT's default).

    python benchmarks/model_step.py                      # CUDA, bf16, Qwen2-7B shape, 4096 tokens
    python benchmarks/model_step.py --tiny               # CPU-sized smoke run (CI), float32
    python benchmarks/model_step.py --profile dude,lora  # + where one step's time goes
    python benchmarks/model_step.py --quant only --layers 8   # QLoRA vs QDuDe alone, 8 decoder layers
    python benchmarks/model_step.py --count-ops --device cpu --layers 1 --tokens 32   # ops per step, no GPU
    python benchmarks/model_step.py --activations --device cpu --tokens 256   # activation memory, no GPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from dude_trl import DuDeConfig, get_dude_model

TARGETS = ["q_proj", "v_proj"]
#: Qwen2-7B's published architecture (random weights here).
QWEN2_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
)


def build_base(shape: dict, dtype: torch.dtype, device: str) -> Qwen2ForCausalLM:
    config = Qwen2Config(**shape, use_cache=False)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def quantize_base(model: Qwen2ForCausalLM, device: str, tmpdir: str) -> Qwen2ForCausalLM:
    """The same random model reloaded with bitsandbytes NF4 (compute in the model's dtype)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = next(model.parameters()).dtype
    model.save_pretrained(tmpdir, safe_serialization=True)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(tmpdir, quantization_config=bnb, dtype=dtype, device_map={"": device})


def wrap(method: str, base, r: int):
    """`base` with the method's adapter on q/v (PEFT's LoRA/DoRA, or DuDe through get_dude_model)."""
    if method in ("lora", "qlora"):
        return get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
    if method == "dora":
        return get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, use_dora=True))
    config = DuDeConfig(r=r, lora_alpha=r, target_modules=TARGETS, method="dude", svd_niter=2)
    if method == "dude":
        return get_dude_model(base, config, progress=False)
    if method == "qdude":
        from transformers import BitsAndBytesConfig

        # Already quantized: its own settings are kept (decomposed from the dequantized weights).
        return get_dude_model(base, config, quantization_config=BitsAndBytesConfig(load_in_4bit=True), progress=False)
    raise ValueError(f"unknown method {method!r}")


def set_checkpointing(model, on: bool) -> None:
    """Non-reentrant activation checkpointing on/off (transformers 5 renamed the methods)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        kwargs = {"use_reentrant": False}
        try:
            enable(activation_checkpointing_kwargs=kwargs)
        except TypeError:
            enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, ids, autocast: bool = False) -> None:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@dataclass
class Result:
    group: str
    checkpointing: bool
    method: str
    step_s: float
    peak_gib: Optional[float]
    time_ratio: float = 0.0
    mem_ratio: Optional[float] = None


def measure(method, base, args, device, ids, checkpointing: bool) -> tuple[float, Optional[float]]:
    model = wrap(method, base, args.r)
    model.train()
    if checkpointing:
        set_checkpointing(model.base_model.model, True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(args.warmup):
        train_step(model, opt, ids, args.autocast)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step(model, opt, ids, args.autocast)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if method in args.profile and checkpointing == args.checkpointing_for_profile and method not in args.profiled:
        args.profiled.add(method)
        profile_step(model, opt, ids, device, args.autocast, f"{method}, checkpointing {'on' if checkpointing else 'off'}",
                     args.profile_file)
    if checkpointing:
        set_checkpointing(model.base_model.model, False)
    model.unload()  # back to the plain base (DuDe leaves the residual in it: same cost)
    del model, opt
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), peak


def profile_step(model, opt, ids, device: str, autocast: bool, label: str, path: Optional[str] = None,
                 rows: int = 30) -> None:
    """Where one step's time goes, by operator (self time), printed or appended to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, opt, ids, autocast)
        sync(device)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    table = f"## one step of {label}\n" + prof.key_averages().table(sort_by=key, row_limit=rows) + "\n"
    if path:
        with open(path, "a") as f:
            f.write(table)
    else:
        print(table)


#: Operators that launch no kernel (views, allocations, metadata), left out of `count_ops`.
_NO_KERNEL_OPS = {
    "view", "_unsafe_view", "as_strided", "t", "transpose", "detach", "alias", "expand", "slice", "select",
    "reshape", "unsqueeze", "squeeze", "permute", "resolve_conj", "resolve_neg", "empty", "empty_strided",
    "empty_like", "lift_fresh", "result_type", "_local_scalar_dense",
}


def count_ops(method: str, base, args, ids) -> int:
    """Operators one optimizer step dispatches, views and allocations excluded: on a GPU, each is
    (at least) a kernel launch and its host overhead, which is what a launch-bound step pays for."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, func_args=(), kwargs=None):
            if func.__name__.split(".")[0] not in _NO_KERNEL_OPS:
                Counter.count += 1
            return func(*func_args, **(kwargs or {}))

    model = wrap(method, base, args.r)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    train_step(model, opt, ids, args.autocast)  # caches and optimizer state exist from here on
    with Counter():
        train_step(model, opt, ids, args.autocast)
    model.unload()
    return Counter.count


def layer_activation_bytes(method: str, base, args, device, ids) -> int:
    """Bytes one decoder layer keeps for backward (no checkpointing), parameters excluded,
    storages shared between saved tensors counted once."""
    model = wrap(method, base, args.r)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    layer = model.base_model.model.model.layers[0]
    handles = [layer.register_forward_pre_hook(lambda *_: hooks.__enter__()),
               layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))]
    model(input_ids=ids, labels=ids).loss.backward()
    for handle in handles:
        handle.remove()
    model.unload()
    return sum(storages.values())


def activation_estimate(args, device, dtype) -> dict:
    """Model-level activation memory without a big GPU: one decoder layer of the real shape
    (vocabulary cut to 1024, which only changes the logits, equal for every method) measured
    at ``--tokens`` and half as many tokens, fitted as ``fixed + per_token * tokens`` (PEFT
    DoRA keeps token-independent ``out x in`` tensors) and scaled to the model's depth and
    ``--full-tokens``. Reported per method with the ratio to LoRA, next to the weights."""
    shape = dict(TINY if args.tiny else QWEN2_7B)
    layers, vocab = shape["num_hidden_layers"], shape["vocab_size"]
    torch.manual_seed(0)
    base = build_base(dict(shape, num_hidden_layers=1, vocab_size=1024), dtype, device)
    counts = (args.tokens // 2, args.tokens)
    ids = [torch.randint(0, 1024, (1, n), device=device) for n in counts]
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**shape)).parameters())
    weights_gib = n_params * torch.finfo(dtype).bits / 8 / 2**30
    print(f"# one decoder layer's saved activations at {counts[0]} and {counts[1]} tokens, {dtype}, scaled to "
          f"{layers} layers x {args.full_tokens} tokens; weights {weights_gib:.2f} GiB ({n_params / 1e9:.2f} B params, "
          f"vocab {vocab}; logits and loss not included)")
    print(f"{'method':>6} {'KiB/token/layer':>16} {'MiB/layer fixed':>16} {'activations GiB':>16} {'vs LoRA':>8}")
    results: dict = {"weights_gib": weights_gib}
    for method in [m for m in args.methods.split(",") if m in ("lora", "dora", "dude")]:
        small, large = (layer_activation_bytes(method, base, args, device, i) for i in ids)
        per_token = (large - small) / (counts[1] - counts[0])
        fixed = max(0.0, large - per_token * counts[1])
        total = (fixed + per_token * args.full_tokens) * layers
        results[method] = {"bytes_per_token_per_layer": per_token, "fixed_bytes_per_layer": fixed,
                           "activations_gib": total / 2**30}
        ratio = total / (results["lora"]["activations_gib"] * 2**30) if "lora" in results else float("nan")
        print(f"{method:>6} {per_token / 1024:16.2f} {fixed / 2**20:16.1f} {total / 2**30:16.2f} {ratio:8.3f}",
              flush=True)
    return results


def run_group(group, methods, base, args, device, ids) -> list[Result]:
    results = []
    for checkpointing in args.checkpointing:
        times = {m: [] for m in methods}
        peaks = {m: [] for m in methods}
        for rnd in range(args.rounds):
            order = methods[rnd % len(methods):] + methods[: rnd % len(methods)]
            for method in order:
                step_s, peak = measure(method, base, args, device, ids, checkpointing)
                times[method].append(step_s)
                peaks[method].append(peak)
        reference = methods[0]
        ref_t = statistics.median(times[reference])
        ref_m = max(peaks[reference]) if device == "cuda" else None
        for method in methods:
            t = statistics.median(times[method])
            m = max(peaks[method]) if device == "cuda" else None
            results.append(
                Result(group, checkpointing, method, t, m, t / ref_t, None if m is None else m / ref_m)
            )
            mem = "   n/a" if m is None else f"{m:6.2f}"
            ratio = "   n/a" if m is None else f"{m / ref_m:6.3f}"
            print(f"{group:>5} {'on' if checkpointing else 'off':>4} {method:>6} {t * 1e3:10.1f} {mem} "
                  f"{t / ref_t:7.3f} {ratio}", flush=True)
    return results


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen2, float32, few tokens: a CPU smoke run")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch (4096; --tiny: 64)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (5; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; --tiny: 1)")
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run")
    parser.add_argument("--methods", default="lora,dora,dude")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--quant", default="auto", choices=["auto", "yes", "no", "only"],
                        help="also QLoRA vs QDuDe on a 4-bit base (auto: when bitsandbytes is installed; "
                             "only: just those)")
    parser.add_argument("--autocast", default="auto", choices=["auto", "on", "off"],
                        help="bf16 autocast around forward (auto: on with CUDA, as Trainer(bf16=True))")
    parser.add_argument("--profile", default="", help="profile one step of these methods (comma separated)")
    parser.add_argument("--profile-file", default=None, help="append the profiler tables here instead of printing")
    parser.add_argument("--activations", action="store_true",
                        help="only measure one real-shaped decoder layer's saved activations and scale them to the "
                             "model (runs on CPU; --tokens is what is measured, --full-tokens what it is scaled to)")
    parser.add_argument("--full-tokens", type=int, default=4096)
    parser.add_argument("--count-ops", action="store_true",
                        help="only count the operators (kernel launches) one step dispatches, per method")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.tokens = args.tokens or (64 if args.tiny else 4096)
    args.steps = args.steps or (2 if args.tiny else 5)
    args.rounds = args.rounds or (1 if args.tiny else 3)
    args.checkpointing = [{"off": False, "on": True}[v] for v in args.checkpointing.split(",")]
    args.checkpointing_for_profile = args.checkpointing[-1]
    args.profile, args.profiled = {m for m in args.profile.split(",") if m}, set()
    args.autocast = args.autocast == "on" or (args.autocast == "auto" and device == "cuda")
    methods = [m for m in args.methods.split(",") if m] if args.quant != "only" else []
    # bf16 on CUDA; counting operators needs no GPU but the GPU's dtypes (they pick the code paths).
    dtype = torch.bfloat16 if (device == "cuda" or args.count_ops) and not args.tiny else torch.float32
    shape = dict(TINY if args.tiny else QWEN2_7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    quant = args.quant in ("yes", "only") or (
        args.quant == "auto" and importlib.util.find_spec("bitsandbytes") is not None
    )
    logging.getLogger("dude_trl").setLevel(logging.ERROR)
    if args.activations:
        results = activation_estimate(args, device, torch.bfloat16 if not args.tiny else torch.float32)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"argv": sys.argv[1:], "activations": results}, f, indent=1)
        return []

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    if args.count_ops:
        torch.manual_seed(0)
        base = build_base(shape, dtype, device)
        ids = torch.randint(0, shape["vocab_size"], (1, args.tokens), device=device)
        counts = {m: count_ops(m, base, args, ids) for m in methods}
        layers = shape["num_hidden_layers"]
        print(f"# operators per optimizer step (views excluded), {layers} decoder layer(s), {dtype}"
              f"{' + autocast' if args.autocast else ''}, {args.tokens} tokens, {where}")
        for method, count in counts.items():
            print(f"{method:>6} {count:7d} ops  {count / counts[methods[0]]:6.3f}x {methods[0]}  "
                  f"{(count - counts[methods[0]]) / layers:+7.1f} per decoder layer", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"argv": sys.argv[1:], "layers": layers, "op_counts": counts}, f, indent=1)
        return []
    print(f"# model_step: Qwen2 {'tiny' if args.tiny else '7B'}-shaped ({shape['num_hidden_layers']} layers), random "
          f"weights, {dtype}{' + bf16 autocast' if args.autocast else ''}, {where}, {args.tokens} tokens, r={args.r} "
          f"on {TARGETS}, {args.rounds} round(s) x {args.steps} steps")
    print(f"{'group':>5} {'ckpt':>4} {'method':>6} {'step ms':>10} {'peak GiB':>6} {'t/ref':>7} {'m/ref':>6}")
    torch.manual_seed(0)
    base = build_base(shape, dtype, device)
    ids = torch.randint(0, shape["vocab_size"], (1, args.tokens), device=device)
    results = run_group("bf16" if dtype == torch.bfloat16 else "fp32", methods, base, args, device, ids) if methods else []
    if quant:
        with tempfile.TemporaryDirectory(prefix="model-step-") as tmpdir:
            qbase = quantize_base(base, device, tmpdir)
            del base
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            results += run_group("4bit", ["qlora", "qdude"], qbase, args, device, ids)
    if args.json:
        meta = {"device": where, "dtype": str(dtype), "tokens": args.tokens, "layers": shape["num_hidden_layers"],
                "autocast": args.autocast, "argv": sys.argv[1:], "load_avg": os.getloadavg()[0]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
