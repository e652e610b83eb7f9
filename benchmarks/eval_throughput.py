"""GSM8K evaluation throughput (samples/s): batch size 1 vs batched, on a small offline model.

Runs ``dude_trl.eval.evaluate`` with the GSM8K task on the same synthetic test questions once per
batch size, after a short warm-up, repeating each ``--repeats`` times in alternating
order (so drift in machine load hits both alike) and keeping the best time. Prints
samples/s per batch size, the speedup over batch 1, and whether the accuracies match
(greedy decoding with correct left padding gives the same completions at any batch size,
up to float rounding).

    python benchmarks/eval_throughput.py                                  # random Llama
    python benchmarks/eval_throughput.py --model models/SmolLM2-135M-Instruct
    python benchmarks/eval_throughput.py --device cuda --json eval.json

Without ``--model`` the model is a randomly initialised Llama (``--hidden``, ``--layers``)
with a byte-level BPE tokenizer trained here on synthetic problems; its greedy output
rarely hits EOS, so every question generates the full ``--max-new-tokens``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dude_trl.synthetic import make_gsm8k_dataset
from dude_trl.eval import GSM8KTask, evaluate


def random_llama(hidden: int, layers: int) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random-weight Llama and a byte-level BPE tokenizer trained on synthetic problems."""
    corpus = make_gsm8k_dataset(500, seed=0, split="train")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(corpus["question"]) + list(corpus["answer"]), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=2048,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def load_model(path: str | None, hidden: int, layers: int):
    if path is None:
        model, tokenizer = random_llama(hidden, layers)
        name = f"random Llama (hidden {hidden}, {layers} layers)"
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        name = os.path.basename(os.path.normpath(path))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return model, tokenizer, f"{name}, {params:.1f}M params"


def time_evaluate(model, tokenizer, dataset, batch_size: int, max_new_tokens: int) -> tuple[float, dict]:
    start = time.perf_counter()
    result = evaluate(model, tokenizer, GSM8KTask(), dataset, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, progress=False)
    return time.perf_counter() - start, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local transformers checkpoint; default: random Llama")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="first one is the baseline")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    model, tokenizer, description = load_model(args.model, args.hidden, args.layers)
    model.to(device)
    description += f", {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
    dataset = make_gsm8k_dataset(args.num_samples, seed=0, split="test")
    evaluate(model, tokenizer, GSM8KTask(), dataset, batch_size=2, num_samples=2, max_new_tokens=4,
             progress=False)  # warm-up

    best: dict[int, float] = {}
    results: dict[int, dict] = {}
    for repeat in range(args.repeats):
        order = args.batch_sizes if repeat % 2 == 0 else list(reversed(args.batch_sizes))
        for batch_size in order:
            seconds, results[batch_size] = time_evaluate(model, tokenizer, dataset, batch_size, args.max_new_tokens)
            best[batch_size] = min(best.get(batch_size, float("inf")), seconds)

    baseline = args.batch_sizes[0]
    print(f"model: {description}; {args.num_samples} questions, max_new_tokens={args.max_new_tokens}, "
          f"torch threads={torch.get_num_threads()}, best of {args.repeats}")
    print("| batch size | seconds | samples/s | speedup vs batch 1 | accuracy |")
    print("|---:|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        seconds = best[batch_size]
        print(f"| {batch_size} | {seconds:.2f} | {args.num_samples / seconds:.2f} | "
              f"{best[baseline] / seconds:.2f}x | {results[batch_size]['metrics']['accuracy']:.3f} |")
    same = len({round(r["metrics"]["accuracy"], 6) for r in results.values()}) == 1
    print(f"accuracies equal across batch sizes: {same}")
    summary = {
        "model": description, "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
        "seconds": {str(b): best[b] for b in args.batch_sizes},
        "speedup": {str(b): best[baseline] / best[b] for b in args.batch_sizes},
        "accuracies_equal": same,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
