"""Trainer callbacks: gradient-norm logging and in-loop GSM8K evaluation."""

from .grad_norm import GradNormCallback
from .gsm8k_eval import GSM8KEvalCallback

__all__ = ["GradNormCallback", "GSM8KEvalCallback"]
