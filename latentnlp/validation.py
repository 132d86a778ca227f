"""The one validation switch: ``torch.distributions``' own ``validate_args`` semantics.

Every public entry point of latentnlp (distributions, layers, models) checks its inputs when
validation is on and checks nothing -- in particular, never synchronises with the device --
when it is off.  The switch is torch's::

    torch.distributions.Distribution.set_default_validate_args(False)   # global, as in torch

and a per-object ``validate_args=`` argument overrides it, as for any torch distribution.
Validation is on by default (``__debug__``), off under ``python -O``.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Distribution

__all__ = ["describe", "is_validating"]


def is_validating(validate_args: bool | None = None) -> bool:
    """``validate_args`` if given, else torch's global default (``Distribution._validate_args``)."""
    return Distribution._validate_args if validate_args is None else bool(validate_args)


def describe(value: object) -> str:
    """How an error message shows an argument it refuses: ``"shape (2, 3)"`` for a tensor, else its type."""
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
