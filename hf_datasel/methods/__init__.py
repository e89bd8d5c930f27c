"""Step 3 of the flow: selection methods, one module each, behind one registry.

A method is a function `(ctx: SelectionContext, **params) -> Selection`. Adding one is a
new module here plus one line in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Selection, SelectionContext
from .g2is import select_g2is
from .less import select_less
from .loss import select_by_loss
from .random import select_random
from .s2l import select_s2l
from .spectral import select_spectral

METHODS: dict[str, Callable[..., Selection]] = {
    "random": select_random,
    "loss": select_by_loss,
    "s2l": select_s2l,
    "less": select_less,
    "spectral": select_spectral,
    "g2is": select_g2is,
}


def get_method(name: str) -> Callable[..., Selection]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown selection method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Selection", "SelectionContext", "get_method"]
