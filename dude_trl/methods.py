"""The method table: what DuDe and each baseline are, one row per method.

A method is two choices: whether a trainable magnitude vector rescales each output row
(DoRA's decomposition), and how the top-r SVD of the pretrained weight is split between the
LoRA factors, if it is used at all (PiSSA's initialisation). With ``U_r S_r V_r^T`` the top-r
SVD and ``s`` the LoRA scaling, the splits are (DESIGN.md, "The method"):

    "sqrt":  B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T
    "A":     B = U_r,                A = (S_r / s) V_r^T
    "B":     B = U_r (S_r / s),      A = V_r^T
    None:    Kaiming A, zero B (LoRA's initialisation; the base is left as it is)

A new method is one row. This module imports nothing, so planning tools read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        has_magnitude: a trainable per-row magnitude vector (DoRA's decomposition).
        split: where the singular values go (``"sqrt"``, ``"A"``, ``"B"``), or None for
            LoRA's Kaiming/zero initialisation on the unchanged base.
    """

    has_magnitude: bool
    split: Optional[str]

    @property
    def uses_svd_init(self) -> bool:
        """A, B come from the SVD of the base weight, and the base holds the residual."""
        return self.split is not None


METHOD_TABLE: dict[str, Method] = {
    "dude": Method(has_magnitude=True, split="sqrt"),
    "dude_a": Method(has_magnitude=True, split="A"),
    "dude_b": Method(has_magnitude=True, split="B"),
    "lora": Method(has_magnitude=False, split=None),
    "dora": Method(has_magnitude=True, split=None),
    "pissa": Method(has_magnitude=False, split="sqrt"),
}
METHODS = tuple(METHOD_TABLE)


def get_method(name: str) -> Method:
    """The table row of `name`; a `ValueError` listing the methods for an unknown one."""
    try:
        return METHOD_TABLE[name]
    except KeyError:
        raise ValueError(f"Unknown DuDe method {name!r}; choose one of {', '.join(METHODS)}.") from None
