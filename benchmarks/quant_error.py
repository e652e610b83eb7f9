"""How much closer QDuDe's initial weights are to the full-precision model than plain NF4.

For each target module of a real checkpoint, with ``E = W0 - W_eff``:

- plain NF4 (QLoRA at init, B = 0):  ``W_eff = deq(q(W0))``
- QDuDe:                             ``W_eff = deq(q(W_res)) + s*B@A``, ``W_res = W0 - s*B@A``
- QDuDe + refinement (quant_iters):  the same, A, B re-fitted to what quantization lost

it prints the Frobenius and nuclear norms of E (averaged over modules) and the reduction
against plain NF4, then the error of the whole model's logits at init against the
full-precision model. A, B come from `dude_trl.svd.fit_factors`, the function
`get_dude_model(..., quantization_config=...)` uses.

    python benchmarks/quant_error.py --model models/SmolLM2-135M-Instruct --threads 1 --ranks 16 64 --iters 0 1 2 5
    python benchmarks/quant_error.py --model models/SmolLM2-135M-Instruct --threads 1 --targets all --ranks 16 --iters 0 2
    python benchmarks/quant_error.py --model models/SmolLM2-135M-Instruct --memory
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from dude_trl import DuDeConfig
from dude_trl.bases.bnb_storage import QuantSpec, prepare_bnb_layers_
from dude_trl.model import get_dude_model
from dude_trl.svd import fit_factors, layer_seed

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = [
    "The quick brown fox jumps over the lazy dog. Transformers learn representations of language by "
    "predicting the next token, and low-rank adapters fine-tune them cheaply.",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Answer: 48 + 24 = 72.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of",
]


def weight_errors(model, targets: list[str], r: int, alpha: float, spec: QuantSpec, iters: list[int]) -> dict:
    """Mean Frobenius / nuclear error per setting over the target modules."""
    scaling = alpha / r
    sums: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        W0 = module.weight.detach().float()
        errors = {"plain": W0 - spec.roundtrip(W0)}
        for T in iters:
            f = fit_factors(W0, r, scaling, "dude", spec.roundtrip, quant_iters=T, seed=layer_seed(0, name))
            residual = W0 - scaling * (f.B @ f.A)
            errors[f"qdude T={T}"] = residual - spec.roundtrip(residual)
        for key, E in errors.items():
            fro = torch.linalg.matrix_norm(E).item()
            nuc = torch.linalg.matrix_norm(E, ord="nuc").item()
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += fro
            acc[1] += nuc
            if key != "plain":
                plain = errors["plain"]
                rr = ratios.setdefault(key, [0.0, 0.0])
                rr[0] += fro / torch.linalg.matrix_norm(plain).item()
                rr[1] += nuc / torch.linalg.matrix_norm(plain, ord="nuc").item()
        count += 1
    return {
        key: (s[0] / count, s[1] / count, *(tuple(x / count for x in ratios[key]) if key in ratios else (1.0, 1.0)))
        for key, s in sums.items()
    } | {"_modules": count}


def eval_texts(num_problems: int = 12) -> list[str]:
    """The fixed prose above plus synthetic GSM8K-style problems with worked answers."""
    from dude_trl.synthetic import make_gsm8k_dataset

    problems = make_gsm8k_dataset(num_problems, seed=0, split="test")
    return TEXT + [f"Question: {q}\nAnswer: {a}" for q, a in zip(problems["question"], problems["answer"])]


@torch.no_grad()
def reference_logits(model, batches) -> list[torch.Tensor]:
    """Full-precision logits at the real (unpadded) tokens, kept in float16 to bound memory."""
    model.eval()
    return [model(**b).logits[b["attention_mask"].bool()].half() for b in batches]


@torch.no_grad()
def logits_error(reference: list[torch.Tensor], model, batches) -> tuple[float, float, float]:
    """(relative Frobenius error of the logits, mean KL(p_ref || p) per token, top-1 agreement)."""
    model.eval()
    err_sq = ref_sq = kl = agree = tokens = 0.0
    for ref, batch in zip(reference, batches):
        ref = ref.float()
        got = model(**batch).logits[batch["attention_mask"].bool()].float()
        err_sq += (got - ref).square().sum().item()
        ref_sq += ref.square().sum().item()
        kl += torch.nn.functional.kl_div(
            got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum"
        ).item()
        agree += (got.argmax(-1) == ref.argmax(-1)).sum().item()
        tokens += ref.shape[0]
    return (err_sq / ref_sq) ** 0.5, kl / tokens, agree / tokens

def _peak_anonymous_memory(job: str, model_path: str, queue) -> None:
    """Run one load in this (fresh) process; report (peak anonymous RSS above the baseline,
    size of the loaded model's tensors, adapters and saved initial factors included) in MiB.

    Anonymous memory excludes the checkpoint's memory-mapped file pages, which the kernel can
    drop at will (a float32 model loaded from a float32 checkpoint lives in them entirely);
    a thread samples /proc/self/status while the load runs."""
    import threading

    peak = [0]
    done = threading.Event()

    def rss_anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            done.wait(0.005)

    torch.set_num_threads(1)
    start = rss_anon()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if job == "full precision (fp32)":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    elif job == "plain NF4":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, quantization_config=bnb)
    else:
        config = DuDeConfig(r=16, lora_alpha=16, target_modules=ALL_LINEAR, method="dude")
        model = get_dude_model(model_path, config, quantization_config=bnb, progress=False)
    done.set()
    thread.join()
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights count once
    tensors = sum(t.numel() * t.element_size() for t in unique.values())
    queue.put(((peak[0] - start) / 1024, tensors / 2**20))


def memory_report(model_path: str) -> None:
    import multiprocessing as mp

    # glibc's default mmap threshold grows after the first large free, after which freed
    # per-layer temporaries stay in the heap and RSS no longer tracks live memory. A fixed
    # threshold returns them to the OS, so the peak below is the live peak.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    ctx = mp.get_context("spawn")
    print("\n## Memory while loading (fresh process each, CPU)")
    print(f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}\n")
    print("| load | peak anonymous MiB above baseline | model tensors MiB |")
    print("|---|---|---|")
    for job in ("full precision (fp32)", "plain NF4", "QDuDe NF4, all linear, r=16"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_anonymous_memory, args=(job, model_path, queue))
        proc.start()
        peak, tensors = queue.get()
        proc.join()
        print(f"| {job} | {peak:.0f} | {tensors:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, nargs="+", default=[0, 5], help="quant_iters settings to compare")
    parser.add_argument(
        "--targets", nargs="+", choices=["qv", "all"], default=["qv"], help="q,v and/or all linear layers (slow)"
    )
    parser.add_argument("--double-quant", action="store_true", help="NF4 with double quantization")
    parser.add_argument("--skip-logits", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--memory", action="store_true", help="only measure peak memory while loading")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        memory_report(args.model)
        return

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=args.double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    spec = QuantSpec.from_config(bnb_config, dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"model: {args.model}  quantization: {spec.label}, blocksize {spec.blocksize}  alpha = r (s = 1)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")

    target_sets = {"qv": ("q,v", ["q_proj", "v_proj"]), "all": ("all linear", ALL_LINEAR)}
    target_sets = dict(target_sets[t] for t in args.targets)
    print("## Weight error per target module, ||W0 - W_eff||, mean over modules")
    print("| targets | r | setting | Frobenius | nuclear | Frobenius vs NF4 | nuclear vs NF4 |")
    print("|---|---|---|---|---|---|---|")
    for label, targets in target_sets.items():
        for r in args.ranks:
            t = time.perf_counter()
            result = weight_errors(full, targets, r, float(r), spec, args.iters)
            n = result.pop("_modules")
            for key, (fro, nuc, rfro, rnuc) in result.items():
                change = "" if key == "plain" else f"{100 * (rfro - 1):+.1f}%"
                change_n = "" if key == "plain" else f"{100 * (rnuc - 1):+.1f}%"
                name = "plain NF4" if key == "plain" else key
                print(f"| {label} ({n}) | {r} | {name} | {fro:.4f} | {nuc:.3f} | {change} | {change_n} |")
            print(f"<!-- {label} r={r}: {time.perf_counter() - t:.0f} s -->")

    if args.skip_logits:
        return
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    texts = eval_texts()
    batches = [tokenizer(texts[i : i + 4], return_tensors="pt", padding=True) for i in range(0, len(texts), 4)]
    reference = reference_logits(full, batches)
    del full
    print("\n## Logits at init against the full-precision model")
    print(f"{sum(int(b['attention_mask'].sum()) for b in batches)} tokens in {len(texts)} sequences.\n")
    print("| model | r | rel. logits error | KL(full || model) / token | top-1 agreement |")
    print("|---|---|---|---|---|")
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=bnb_config)
    prepare_bnb_layers_(plain)
    rel, kl, top1 = logits_error(reference, plain, batches)
    print(f"| plain NF4 (+ LoRA, B = 0) | any | {rel:.4f} | {kl:.5f} | {top1:.3f} |")
    del plain
    for label, targets in target_sets.items():
        for r in args.ranks:
            for T in args.iters:
                config = DuDeConfig(r=r, lora_alpha=r, target_modules=targets, method="dude", quant_iters=T)
                model = get_dude_model(args.model, config, quantization_config=bnb_config, progress=False)
                rel, kl, top1 = logits_error(reference, model, batches)
                print(f"| QDuDe {label}, T={T} | {r} | {rel:.4f} | {kl:.5f} | {top1:.3f} |")
                del model


if __name__ == "__main__":
    main()
