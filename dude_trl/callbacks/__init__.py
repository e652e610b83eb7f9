"""Trainer callbacks: gradient-norm logging and in-loop evaluation (any task; GSM8K ready-made)."""

from .eval import EvalCallback
from .grad_norm import GradNormCallback
from .gsm8k_eval import GSM8KEvalCallback

__all__ = ["EvalCallback", "GradNormCallback", "GSM8KEvalCallback"]
