"""State a model carries from one batch of a BPTT stream to the next.

On a stream (``batch["stream"]``) consecutive batches continue each other row by row, so a model
carries what it ends one batch with into the next: the LSTM its hidden and cell state, the HMM its
last filtering distribution. :class:`CarriesStreamState` keeps those tensors in one dict,
:attr:`~CarriesStreamState.carried`, forgets them in :meth:`~CarriesStreamState.reset_state` (the
trainer calls it at the start of every pass) and puts them in the model's ``state_dict()``
(``_extra_state``), so a run resumed from a checkpoint continues the stream bit-identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

__all__ = ["CarriesStreamState"]


class CarriesStreamState:
    """Mixin for an ``nn.Module`` that carries named tensors along a stream (``None`` when none yet).

    A subclass lists the names in :attr:`carried_names` and calls :meth:`reset_state` in its
    ``__init__``; it reads and writes ``self.carried[name]``.
    """

    #: the names of the carried tensors (the keys of :attr:`carried` and of the extra state)
    carried_names: ClassVar[tuple[str, ...]] = ()

    carried: dict[str, Tensor | None]

    def reset_state(self) -> None:
        """Forget everything carried: the next stream batch starts afresh."""
        self.carried = dict.fromkeys(self.carried_names)

    def get_extra_state(self) -> dict[str, Tensor | None]:
        return dict(self.carried)

    def set_extra_state(self, state: Mapping[str, Tensor | None]) -> None:
        self.carried = {name: state[name] for name in self.carried_names}
