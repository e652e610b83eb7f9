"""What `with model.disable_adapter():` computes on a real model, against the pretrained model.

A DuDe model stores the residual ``W0 - s B0 A0`` as each target's base weight; with its adapter
disabled it must still compute the pretrained model (`dude_trl.pretrained`). This prints, on
SmolLM2-135M-Instruct and 16 GSM8K problems with their solutions, the max |logit difference|,
the KL divergence per token and the top-1 agreement against the full-precision pretrained model of:

- the DuDe model with its adapter disabled (after moving A, B, m as training would);
- the same without the principal part added back (what PEFT's own path gives: the residual model);
- on a bitsandbytes NF4 base: QDuDe disabled (``deq(q(W_res)) + s B0 A0``) and plain NF4 ``deq(q(W0))``;

and what the forward hook costs, the same model with and without it (medians of 11, alternating): the
rank-r correction with the adapter disabled, and the hot path (adapter active), for the whole
model's forward and for one small layer's call.

    python benchmarks/pretrained_view.py --model models/SmolLM2-135M-Instruct --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from dude_trl import DuDeConfig, get_dude_model
from dude_trl.pretrained import add_principal_output

GSM8K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "train.jsonl")


def texts(path: str, count: int) -> list[str]:
    with open(path) as f:
        rows = [json.loads(line) for _, line in zip(range(count), f)]
    return [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def compare(name: str, got: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> None:
    diff = (got - reference).abs().amax(dim=-1)[mask].max().item()
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(got, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean().item()
    agree = (got.argmax(-1) == reference.argmax(-1))[mask].float().mean().item()
    print(f"| {name} | {diff:.2e} | {kl:.2e} | {100 * agree:.1f}% |")


def perturbed(model, scale: float = 0.02):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * param.abs().mean() * torch.randn(param.shape, generator=generator))
    return model.eval()


@contextlib.contextmanager
def hooks_removed(model):
    """`model` without the forward hook that adds the principal part: PEFT's own path (the residual
    model when disabled)."""
    removed = []
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if hook is add_principal_output:
                removed.append((module, key, module._forward_hooks.pop(key)))
    try:
        yield model
    finally:
        for module, key, hook in removed:
            module._forward_hooks[key] = hook


def paired_medians(first, second, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of `first` and of `second`, run alternately so that drift hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def accuracy_table(args, pretrained, model, config, batch) -> None:
    """The table of the module docstring: each model against the fp32 pretrained one."""
    reference = logits(pretrained, batch)
    mask = batch["attention_mask"].bool()
    print(f"{args.model}, r={args.r}, targets {args.targets}, {int(mask.sum())} tokens; against the fp32 pretrained model\n")
    print("| model | max abs logit diff | KL(pretrained || model) / token | top-1 agreement |\n|---|---|---|---|")
    compare("DuDe, adapter active (moved as training would)", logits(model, batch), reference, mask)
    with model.disable_adapter():
        compare("DuDe, `disable_adapter()`", logits(model, batch), reference, mask)
        with hooks_removed(model):
            compare("DuDe, `disable_adapter()` without the principal part (PEFT's path)", logits(model, batch), reference, mask)
    compare("DuDe, `unload()`", logits(copy.deepcopy(model).unload(), batch), reference, mask)
    if not args.skip_nf4:
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        qdude = perturbed(get_dude_model(args.model, config, quantization_config=nf4, progress=False))
        with qdude.disable_adapter():
            compare("QDuDe (NF4), `disable_adapter()`: deq(q(W_res)) + s B0 A0", logits(qdude, batch), reference, mask)
        plain = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=nf4, dtype=torch.float32).eval()
        compare("plain NF4 deq(q(W0)) (QLoRA's reference model)", logits(plain, batch), reference, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=GSM8K, help="GSM8K-format jsonl whose first problems are the texts")
    parser.add_argument("--num-texts", type=int, default=16)
    parser.add_argument("--skip-nf4", action="store_true", help="skip the bitsandbytes NF4 rows")
    parser.add_argument("--timing-only", action="store_true", help="skip the accuracy table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    batch = tokenizer(texts(args.data, args.num_texts), return_tensors="pt", padding=True)
    pretrained = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    config = DuDeConfig(r=args.r, lora_alpha=args.r, target_modules=args.targets, method="dude")
    model = perturbed(get_dude_model(copy.deepcopy(pretrained), config, progress=False))
    if not args.timing_only:
        accuracy_table(args, pretrained, model, config, batch)
    del pretrained

    # Timing: the same model with and without its hooks, alternating, on two texts (a whole-batch
    # forward on this CPU varies by ~10% from run to run, and two model copies differ by a few %).
    timing = {key: value[:2] for key, value in batch.items()}

    def forward(disabled: bool, hooked: bool):
        def run() -> None:
            with model.disable_adapter() if disabled else contextlib.nullcontext():
                with contextlib.nullcontext() if hooked else hooks_removed(model):
                    logits(model, timing)
        return run

    for disabled, label in ((True, "adapter disabled: the rank-r correction"), (False, "adapter active: the hot path")):
        with_hook, without = paired_medians(forward(disabled, True), forward(disabled, False), repeats=11)
        print(f"forward, {label}: {1e3 * with_hook:.1f} ms with the hook, {1e3 * without:.1f} ms without "
              f"({with_hook / without:.3f}x; 2 texts, medians of 11)")
    layer = next(m for m in model.modules() if add_principal_output in m._forward_hooks.values())
    x = torch.randn(1, 8, layer.in_features)
    calls = 2000

    def calling(hooked: bool):
        def run() -> None:
            with torch.no_grad(), contextlib.nullcontext() if hooked else hooks_removed(layer):
                for _ in range(calls):
                    layer(x)
        return run

    torch.set_num_threads(1)  # a small matmul on several threads would time the thread pool, not the hook
    hooked, unhooked = (t / calls for t in paired_medians(calling(True), calling(False), repeats=11))
    print(f"one layer call (8 tokens, adapter active): {1e6 * hooked:.1f} us with the hook, {1e6 * unhooked:.1f} us "
          f"without (+{1e6 * (hooked - unhooked):.1f} us)")


if __name__ == "__main__":
    main()
