"""Shared fixtures: tiny causal LMs and a character-level tokenizer, built locally (no hub)."""

from __future__ import annotations

import os
import string

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<pad>", "<eos>", "<bos>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: tiny, deterministic and able to encode any ASCII text."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def make_llama(seed: int = 0, vocab_size: int = len(SPECIAL) + len(CHARS)) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def make_qwen2(seed: int = 0, vocab_size: int = len(SPECIAL) + len(CHARS)) -> Qwen2ForCausalLM:
    """Qwen2 has biases on q/k/v, which exercises the bias path of the DuDe forward."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).eval()


def perturb_trainable_(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Move every trainable tensor (A, B, m) away from its initial value, as training would;
    returns `model` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def decaying_spectrum_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every Linear below the head a decaying spectrum, like pretrained weights (on a
    random-init model the spectrum is flat and the top-r SVD removes little)."""
    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            out_f, in_f = module.weight.shape
            k = min(out_f, in_f)
            U, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen))
            V, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen))
            s = 2.0 * 0.75 ** torch.arange(k, dtype=torch.float32)
            module.weight.data = (U * s) @ V.T
    return model


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny Qwen2 model + tokenizer, loadable by path like a hub checkpoint."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    make_qwen2().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def float_model() -> LlamaForCausalLM:
    """A tiny Llama with decaying spectra (what QDuDe's SVD and quantization tests decompose)."""
    return decaying_spectrum_(make_llama())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, float_model) -> str:
    """`float_model` and the tokenizer saved, loadable by path (the full-precision checkpoint)."""
    path = tmp_path_factory.mktemp("structured-llama")
    float_model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)
