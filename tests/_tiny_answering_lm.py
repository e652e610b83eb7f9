"""A tiny character-level Llama that has memorised its answers to a few GSM8K-style problems.

Built in seconds on a CPU, so that evaluators can be compared on a real model whose greedy
completions are known: some correct, some wrong, some right only by their last number, and one
that goes on after its final-answer line (where the in-loop evaluator stops and lm-eval does not).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from _tiny_lm_gsm8k import CHARS, SPECIAL

# (question, reference, what the base model learns to answer)
PROBLEMS = [
    ("What is 3 plus 4?", "3+4=7\n#### 7", "3+4=7\n#### 7"),
    ("What is 5 plus 6?", "5+6=11\n#### 11", "5+6=11\n#### 11\nThen 2+2=4"),
    ("What is 8 minus 2?", "8-2=6\n#### 6", "8-2 is 6."),
    ("What is 9 minus 7?", "9-7=2\n#### 2", "9-7=3\n#### 3"),
    ("What is 2 times 6?", "2*6=12\n#### 12", "The answer is 12\nso 12 it is"),
    ("What is 4 times 4?", "4*4=16\n#### 16", "4*4=61\n#### 61"),
]


def prompts(tokenizer: PreTrainedTokenizerFast, question: str) -> list[str]:
    """The two prompts the evaluators ask: through the chat template, and the plain one."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return [chat, f"{tokenizer.bos_token}Question: {question}\nAnswer:"]


def train_to_answer_(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]],
                     steps: int, lr: float) -> torch.nn.Module:
    """Train `model` (its trainable parameters) until it answers each (question, completion) pair, in both
    prompt formats, followed by EOS (plain prompts put a space before the completion)."""
    texts = []
    for question, completion in pairs:
        chat, plain = prompts(tokenizer, question)
        texts += [chat + completion + tokenizer.eos_token, plain + " " + completion + tokenizer.eos_token]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def make_answering_llama(tokenizer: PreTrainedTokenizerFast, steps: int = 300) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64) trained to give `PROBLEMS`' third column."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(CHARS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    return train_to_answer_(model, tokenizer, [(q, c) for q, _, c in PROBLEMS], steps=steps, lr=3e-3)
