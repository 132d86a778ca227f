"""Input checks shared by the output layers: each raises ``ValueError`` naming the layer, the
argument, what was seen and what was expected.

Shape and dtype checks always run.  Checks that read values back from the device (finite
values, id ranges, rows with no valid position, normalisation) run only when validating
(:func:`latentnlp.validation.is_validating`), so a model trained with validation off never
synchronises with the device here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latentnlp.validation import is_validating

__all__ = [
    "IGNORE_INDEX",
    "check_activation",
    "check_finite",
    "check_hidden",
    "check_log_alpha",
    "check_memory_mask",
    "check_target_range",
    "ignored_targets",
    "resolve_memory_mask",
]

#: targets equal to this id are not scored (log-probability 0, no gradient), as in
#: ``torch.nn.functional.cross_entropy``
IGNORE_INDEX = -100

#: ``|logsumexp_m log_alpha_tm|`` above this is "not normalised" (float32 rounding stays far below;
#: half precision is allowed ``16 eps`` of its dtype)
NORMALISATION_TOLERANCE = 1e-3


def _name(layer: nn.Module | str) -> str:
    return layer if isinstance(layer, str) else type(layer).__name__


def check_activation(layer: str, activation: str, choices) -> None:
    """``ValueError`` unless ``activation`` is one of ``choices`` (names of activations)."""
    if activation not in choices:
        raise ValueError(f"{layer}: activation must be one of {sorted(choices)}, got {activation!r}")


def check_hidden(layer: nn.Module, hidden: Tensor, input_size: int, targets: Tensor | None = None) -> None:
    """ValueError naming the argument and the shapes seen when ``hidden``/``targets`` do not fit."""
    name = type(layer).__name__
    if hidden.dim() < 1 or hidden.shape[-1] != input_size:
        raise ValueError(f"{name}: hidden must be [..., {input_size}], got {tuple(hidden.shape)}")
    if targets is not None:
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(
                f"{name}: targets must be hidden.shape[:-1] = {tuple(hidden.shape[:-1])},"
                f" got targets {tuple(targets.shape)}"
            )
        if targets.dtype != torch.long:
            raise ValueError(f"{name}: targets must be a LongTensor, got {targets.dtype}")


def check_finite(layer: nn.Module | str, validate_args: bool | None = None, **tensors: Tensor | None) -> None:
    """When validating: ``ValueError`` naming each argument that holds NaN or +-inf.

    One read from the device for all ``tensors`` (``None`` entries are skipped).
    """
    given = {k: v for k, v in tensors.items() if v is not None and v.is_floating_point()}
    if not given or not is_validating(validate_args):
        return
    bad = torch.stack([(~torch.isfinite(v)).any() for v in given.values()]).tolist()
    names = [k for k, flag in zip(given, bad, strict=True) if flag]
    if names:
        details = ", ".join(
            f"{k} {tuple(given[k].shape)} ({int(torch.isnan(given[k]).sum())} NaN, "
            f"{int(torch.isinf(given[k]).sum())} inf)"
            for k in names
        )
        raise ValueError(f"{_name(layer)}: inputs must be finite, got {details}")


def resolve_memory_mask(
    layer: nn.Module | str, memory_mask: Tensor | None, key_padding_mask: Tensor | None
) -> Tensor | None:
    """The mask True at real source positions, from either polarity.

    ``memory_mask`` is True at real positions (the library's convention); ``key_padding_mask`` is
    True at padding (``torch.nn.MultiheadAttention``'s).  At most one may be given.
    """
    if memory_mask is not None and key_padding_mask is not None:
        raise ValueError(
            f"{_name(layer)}: give memory_mask (True at real positions) or key_padding_mask (True at padding), not both"
        )
    if key_padding_mask is None:
        return memory_mask
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(f"{_name(layer)}: key_padding_mask must be bool, got {key_padding_mask.dtype}")
    return ~key_padding_mask


def check_memory_mask(
    layer: nn.Module | str, memory_mask: Tensor | None, shape: tuple[int, int], validate_args: bool | None = None
) -> None:
    """``memory_mask`` bool ``[B, S]`` = ``shape``, ``S >= 1``; when validating, a real position per row."""
    name = _name(layer)
    if shape[1] == 0:
        raise ValueError(f"{name}: the source is empty (S = 0): memory must be [B, S >= 1, H_s]")
    if memory_mask is None:
        return
    if memory_mask.dtype != torch.bool or tuple(memory_mask.shape) != tuple(shape):
        raise ValueError(
            f"{name}: memory_mask must be bool [B, S] = {tuple(shape)} (True at real positions), "
            f"got {memory_mask.dtype} {tuple(memory_mask.shape)}"
        )
    if is_validating(validate_args) and memory_mask.numel():
        empty = ~memory_mask.any(-1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"{name}: memory_mask has no real (True) position in rows {rows}: every source row needs one"
            )


def check_log_alpha(
    layer: nn.Module | str,
    log_alpha: Tensor,
    shape: tuple[int, ...],
    validate_args: bool | None = None,
    memory_mask: Tensor | None = None,
) -> None:
    """``log_alpha [B, T, S]`` = ``shape``; when validating, normalised alignment log-probabilities.

    Expected: no NaN or ``+inf``, ``-inf`` only where a position is impossible (padding; with
    ``memory_mask [B, S]``, True at real positions, ``-inf`` at every padded one), at least one
    finite entry per row and ``logsumexp_m log_alpha_tm = 0`` (within ``NORMALISATION_TOLERANCE``,
    or ``16 eps`` of a half-precision dtype).
    """
    name = _name(layer)
    if tuple(log_alpha.shape) != tuple(shape):
        raise ValueError(f"{name}: log_alpha must be [B, T, S] = {tuple(shape)}, got {tuple(log_alpha.shape)}")
    if not log_alpha.is_floating_point():
        raise ValueError(f"{name}: log_alpha must be a floating-point tensor, got {log_alpha.dtype}")
    if shape[-1] == 0:
        raise ValueError(f"{name}: the source is empty (S = 0): log_alpha must be [B, T, S >= 1]")
    if not is_validating(validate_args) or log_alpha.numel() == 0:
        return
    nan, pos_inf = torch.isnan(log_alpha).any(), torch.isposinf(log_alpha).any()
    empty = torch.isneginf(log_alpha).all(-1)
    total = torch.logsumexp(log_alpha.detach().double(), -1)
    deviation = torch.where(empty, 0.0, total.abs()).max()
    has_nan, has_inf, n_empty, worst = torch.stack(
        [nan.double(), pos_inf.double(), empty.sum().double(), deviation]
    ).tolist()
    if has_nan or has_inf:
        raise ValueError(f"{name}: log_alpha {tuple(shape)} holds NaN or +inf; expected log-probabilities")
    if n_empty:
        rows = empty.nonzero().tolist()[:5]
        raise ValueError(
            f"{name}: log_alpha is -inf at every source position in {int(n_empty)} rows (first [b, t]: {rows}); "
            "every row needs one possible position"
        )
    if worst > max(NORMALISATION_TOLERANCE, 16 * torch.finfo(log_alpha.dtype).eps):
        raise ValueError(
            f"{name}: log_alpha must be normalised over S (logsumexp over the last dim = 0), "
            f"got |logsumexp| up to {worst:.3g}"
        )
    if memory_mask is not None:
        on_padding = (~memory_mask[:, None, :] & ~torch.isneginf(log_alpha)).sum()
        if int(on_padding):
            raise ValueError(
                f"{name}: log_alpha puts mass on {int(on_padding)} padded source positions (memory_mask False); "
                "expected -inf there"
            )


def check_target_range(
    layer: nn.Module | str,
    targets: Tensor,
    size: int,
    ignore_index: int = IGNORE_INDEX,
    name: str = "targets",
    validate_args: bool | None = None,
) -> None:
    """When validating: every id in ``0..size-1`` or equal to ``ignore_index``, else ``ValueError``."""
    if not is_validating(validate_args) or targets.numel() == 0:
        return
    kept = targets[targets != ignore_index]
    if kept.numel() == 0:
        return
    low, high = torch.stack([kept.min(), kept.max()]).tolist()
    if low < 0 or high >= size:
        raise ValueError(
            f"{_name(layer)}: {name} must lie in 0..{size - 1} (or be ignore_index = {ignore_index}), "
            f"got ids {low}..{high}"
        )


def ignored_targets(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """``(ignored, safe)``: where ``targets == ignore_index`` and the targets with those set to 0.

    A head scores ``safe`` and then writes log-probability 0 where ``ignored`` (``masked_fill``:
    no gradient flows from those positions).
    """
    ignored = targets == ignore_index
    return ignored, targets.masked_fill(ignored, 0)
