"""Tiny offline models and tokenizers for the GSM8K evaluation tests.

- ``make_tokenizer``: character-level tokenizer (any ASCII text round-trips), with
  pad/eos/bos tokens and optionally a small chat template.
- ``make_llama``: a 2-layer Llama with hidden size 32 and random weights.
- ``ScriptedLM``: a stand-in model whose ``generate`` answers each prompt's question
  from a lookup table, correctly or wrongly, with distractor numbers around the answer,
  so accuracy is known exactly and depends on extraction and comparison working.

Run under ``torchrun`` (``python -m torch.distributed.run --nproc_per_node 2
tests/_tiny_lm_gsm8k.py OUT_DIR MODE``) it evaluates with a gloo process group and
writes each rank's result to ``OUT_DIR/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import string
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dude_trl.synthetic import format_number, make_gsm8k_dataset
from dude_trl.gsm8k import extract_answer

SPECIAL = ["<pad>", "<eos>", "<bos>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>\n{% endif %}"
)


def make_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """One token per character; padding side right (the training default)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="right"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(config)


def reference_number(reference: str) -> str:
    answer = extract_answer(reference)
    assert answer is not None, reference
    return answer


class ScriptedLM(torch.nn.Module):
    """Fake causal LM answering from ``answers`` (question -> reference solution).

    ``policy(question, answer) -> bool`` says whether to answer correctly; a wrong
    answer is the reference plus one. The completions mix formats (``####``,
    ``The answer is``, ``\\boxed{}``, ``$1,234.00``) and put a different number
    before the final one, so taking the wrong number breaks the expected accuracy.
    Each call to ``generate`` is recorded in ``calls``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, answers: dict[str, str], policy=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = answers
        self.policy = policy or (lambda question, answer: True)
        self.config = SimpleNamespace(use_cache=False)
        self.calls: list[dict] = []

    def _question_in(self, prompt: str) -> str:
        # With few-shot prompts several known questions may appear; the asked one is last.
        present = [(prompt.rfind(q), q) for q in self.answers if q in prompt]
        return max(present)[1]

    def _completion(self, question: str, number: int) -> str:
        value = float(reference_number(self.answers[question]))
        if not self.policy(question, self.answers[question]):
            value += 1
        text = _fmt(value)
        styles = [
            f"First 12 + 3 = 15.\n#### {text}\n",
            f"We get 7 then 99. The answer is: {text}",
            f"Try 2 and 4, so \\boxed{{{text}}}.",
            f"Total 1 dollar 5 cents... The answer is ${_money(value)} in all.",
        ]
        return styles[number % len(styles)]

    def generate(self, input_ids, attention_mask=None, generation_config=None, stopping_criteria=None,
                 synced_gpus=False, **kwargs):
        assert not self.training, "generate must run in eval mode"
        self.calls.append({
            "batch": int(input_ids.shape[0]),
            "left_padded": bool(attention_mask[:, -1].all()) if attention_mask is not None else True,
            "synced_gpus": synced_gpus,
            "grad_enabled": torch.is_grad_enabled(),
        })
        prompts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        rows = []
        for prompt in prompts:
            question = self._question_in(prompt)
            index = list(self.answers).index(question)
            ids = self.tokenizer(self._completion(question, index), add_special_tokens=False)["input_ids"]
            rows.append(ids + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        new = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=input_ids.dtype)
        for i, row in enumerate(rows):
            new[i, : len(row)] = torch.tensor(row)
        return torch.cat([input_ids, new], dim=1)


def _fmt(value: float) -> str:
    return format_number(round(value)) if float(value).is_integer() else f"{value:g}"


def _money(value: float) -> str:
    """``1234.5`` -> ``1,234.50``: thousands separators and cents."""
    return f"{value:,.2f}"


def answer_table(dataset) -> dict[str, str]:
    return dict(zip(dataset["question"], dataset["answer"]))


def even_answer_policy(question: str, answer: str) -> bool:
    """Correct exactly when the reference answer is an even integer."""
    number = reference_number(answer)
    return "." not in number and int(number) % 2 == 0


def distributed_main(out_dir: str, num_rows: int, batch_size: int) -> None:
    """Evaluate a ScriptedLM on every rank of a gloo group; dump each rank's result.

    A second evaluation pretends ZeRO-3 is active, to check that ``generate`` then
    gets ``synced_gpus=True`` (parameters are not partitioned here).
    """
    from dude_trl import gsm8k
    from dude_trl.eval import generation

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    dataset = make_gsm8k_dataset(num_rows, seed=3, split="test")
    tokenizer = make_tokenizer()
    model = ScriptedLM(tokenizer, answer_table(dataset), policy=even_answer_policy)
    kwargs = dict(batch_size=batch_size, progress=False, num_returned_samples=num_rows)
    result = gsm8k.evaluate(model, tokenizer, dataset, **kwargs)
    result["generate_calls"] = len(model.calls)
    result["rows_generated"] = sum(c["batch"] for c in model.calls)

    generation.zero3_enabled = lambda: True
    zero3_result = gsm8k.evaluate(model, tokenizer, dataset, **kwargs)
    assert zero3_result == {k: v for k, v in result.items() if k in zero3_result}
    result["synced_gpus_seen"] = sorted({c["synced_gpus"] for c in model.calls})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def zero3_training_main(out_dir: str) -> None:
    """Train the tiny Llama for 2 steps under DeepSpeed ZeRO-3 with a GSM8KEvalCallback.

    Each rank evaluates a different share of the prompts, so generation lengths and
    batch counts differ unless ``evaluate`` keeps the ranks in lockstep; a mismatch
    hangs the collective parameter gathers (the launcher's timeout catches that).
    """
    from trl import SFTConfig, SFTTrainer

    from dude_trl.callbacks.gsm8k_eval import GSM8KEvalCallback
    from dude_trl.data import to_sft_format
    from dude_trl.synthetic import make_metamath_dataset

    ds_config = {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_allow_untested_optimizer": True,
    }
    args = SFTConfig(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, max_length=512, disable_tqdm=True,
        deepspeed=ds_config, seed=0,
    )
    callback = GSM8KEvalCallback(make_gsm8k_dataset(5, seed=0, split="test"), eval_steps=1, batch_size=2,
                                 max_new_tokens=6, eval_on_start=True, num_logged_samples=5)
    trainer = SFTTrainer(
        model=make_llama(), args=args, processing_class=make_tokenizer(), callbacks=[callback],
        train_dataset=to_sft_format(make_metamath_dataset(8, seed=0), conversational=False),
    )
    trainer.train()
    rows = [row for row in trainer.state.log_history if "gsm8k/accuracy" in row]
    with open(os.path.join(out_dir, f"zero3_rank{trainer.args.process_index}.json"), "w") as handle:
        json.dump(rows, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--zero3":
        zero3_training_main(sys.argv[2])
    else:
        distributed_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
