"""Per-step overhead of GradNormCallback on a small offline DoRA model.

Builds one `trl.SFTTrainer` per configuration (no callback, `GradNormCallback()`,
`GradNormCallback(per_module=True)`) on identical models and data, then runs them in
interleaved rounds (order rotated every round, so drift in machine load hits all of
them alike) and times every optimizer step, logging included (`logging_steps=1`, the
worst case: one host sync per step).  Prints the median step time of each configuration
and its ratio to the baseline.

On a shared machine the step-time ratio is only as good as the load is steady, so the
callback's own work (its norm computation and the merge into the logs) is also timed
directly, inside the same runs, and reported as a fraction of the baseline step.

    python benchmarks/grad_norm_overhead.py [--rounds 12] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

from dude_trl.callbacks.grad_norm import GradNormCallback

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class StepTimer(TrainerCallback):
    """Wall time between consecutive `on_step_end` events (a full optimizer step + its log)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


class TimedGradNormCallback(GradNormCallback):
    """GradNormCallback that records the wall time of its per-step work (norms + log merge)."""

    def __init__(self, per_module: bool = False) -> None:
        super().__init__(per_module=per_module)
        self.seconds: list[float] = []

    def _record(self, grads, scale: float = 1.0) -> None:
        start = time.perf_counter()
        super()._record(grads, scale)
        self.seconds.append(time.perf_counter() - start)

    def pop_means(self) -> dict[str, float]:
        start = time.perf_counter()
        means = super().pop_means()
        if self.seconds:
            self.seconds[-1] += time.perf_counter() - start
        return means


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_dataset(n: int, seq_len: int, vocab_size: int) -> Dataset:
    ids = torch.randint(vocab_size - 3, (n, seq_len - 1), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row) for row in ids.tolist()]})


def build_model(hidden: int, layers: int, vocab_size: int, rank: int):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    lora = LoraConfig(r=rank, lora_alpha=rank, use_dora=True, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(LlamaForCausalLM(config), lora)


def build_trainer(cli: argparse.Namespace, callbacks: list, output_dir: str) -> tuple[SFTTrainer, StepTimer]:
    timer = StepTimer()
    args = SFTConfig(
        output_dir=output_dir, max_steps=cli.steps, per_device_train_batch_size=cli.batch_size,
        learning_rate=1e-4, logging_steps=1, max_grad_norm=1.0, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), bf16=False, max_length=cli.seq_len, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=build_model(cli.hidden, cli.layers, cli.vocab, cli.rank),
        args=args,
        train_dataset=build_dataset(cli.batch_size * cli.steps * 2, cli.seq_len, cli.vocab),
        processing_class=build_tokenizer(cli.vocab),
        callbacks=[timer, *callbacks],
    )
    return trainer, timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared box)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)

    configs = {
        "no callback": lambda: [],
        "GradNormCallback()": lambda: [TimedGradNormCallback()],
        "GradNormCallback(per_module=True)": lambda: [TimedGradNormCallback(per_module=True)],
    }
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: build_trainer(cli, make(), tmp) for name, make in configs.items()}
        n_params = sum(p.requires_grad for p in runs["no callback"][0].model.parameters())
        names = list(runs)
        for r in range(cli.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                runs[name][0].train()

    base = statistics.median(runs["no callback"][1].times)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__}, {device}; Llama hidden={cli.hidden} layers={cli.layers} "
          f"seq={cli.seq_len} batch={cli.batch_size}; DoRA r={cli.rank} on {len(TARGETS)} modules "
          f"({n_params} trainable tensors); {cli.rounds} interleaved rounds x {cli.steps - 1} timed steps; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'configuration':<36}{'median step (ms)':>18}{'ratio':>9}{'callback work (ms)':>20}{'of base step':>14}")
    for name, (trainer, timer) in runs.items():
        median = statistics.median(timer.times)
        own = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TimedGradNormCallback)]
        work = f"{'-':>20}{'-':>14}"
        if own:
            seconds = statistics.median(own[0].seconds)
            work = f"{seconds * 1e3:>20.3f}{seconds / base:>14.2%}"
        print(f"{name:<36}{median * 1e3:>18.2f}{median / base:>9.3f}{work}")


if __name__ == "__main__":
    sys.exit(main())
