r"""A linear-chain conditional random field over tags: learned transitions on :class:`ChainPosterior`.

For emission scores ``x [B, T, K]`` (a network's score of each tag at each token) and a tag
sequence ``y = (y_0, ..., y_{L-1})`` of a row's length ``L``, the CRF scores

.. math::

    s(y) = \mathrm{start}[y_0] + \sum_{t<L} x[t, y_t] + \sum_{1 \le t < L} W[y_{t-1}, y_t]
           + \mathrm{end}[y_{L-1}], \qquad p(y \mid x) = \exp(s(y) - \log Z(x))

with ``W [K, K]`` (``W[i, j]`` = score of tag ``i`` followed by tag ``j``: row = from),
``start [K]`` and ``end [K]`` the layer's parameters.  This is
``ChainPosterior(init=start, trans=W, emit=x', lengths)`` with the end scores folded into the
emission of each row's last real position, ``x'[t, k] = x[t, k] + end[k] [t = L - 1]``.

Constraints are structural zeros: a disallowed transition, start or end tag scores ``-inf``
(selected by ``torch.where``, so the parameter's gradient there is 0), and no path through it
has probability.  :func:`bio_constraints` and :func:`bioes_constraints` build them for the BIO
and BIOES tagging schemes.

Names follow pytorch-crf (``transitions``, ``start_transitions``, ``end_transitions``, same
orientation), so its parameters copy over unchanged; but this layer is batch first by default
and :meth:`ChainCRF.loss` is the *negative* log-likelihood, averaged over sequences by default
(pytorch-crf's ``forward`` returns the log-likelihood, summed by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from latentnlp import chain
from latentnlp.layers.checks import IGNORE_INDEX
from latentnlp.masks import lengths_to_mask
from latentnlp.precision import computation_dtype
from latentnlp.structures import ChainPosterior
from latentnlp.transitions import DenseTransition
from latentnlp.validation import describe, is_validating

__all__ = ["ChainCRF", "bio_constraints", "bioes_constraints"]

REDUCTIONS = ("mean", "sum", "token_mean", "none")


class ChainCRF(nn.Module):
    r"""Linear-chain CRF layer: ``p(tags | emissions)`` with learned transition, start and end scores.

    Args:
        num_tags: ``K``, the number of tags.
        constraints: ``None`` (every transition allowed), a bool ``[K, K]`` tensor of allowed
            transitions (``allowed[i, j]``: tag ``i`` may be followed by tag ``j``), or a tuple
            ``(allowed_transitions [K, K], allowed_start [K] | None, allowed_end [K] | None)`` as
            returned by :func:`bio_constraints` and :func:`bioes_constraints`.  Disallowed entries
            score ``-inf``; their parameters get zero gradient.
        batch_first: ``True`` (default): emissions ``[B, T, K]``, tags and masks ``[B, T]``.
            ``False``: time first, ``[T, B, K]`` and ``[T, B]``, and the outputs of :meth:`decode`
            and :meth:`marginals` time first too.  pytorch-crf's ``CRF`` defaults to time first.
            :meth:`distribution` is batch first either way (``ChainPosterior``'s convention).
        validate_args: check input values (finite emissions, prefix masks, lengths and tags in
            range); ``None`` follows torch's global ``Distribution`` validation switch.  Shapes
            are always checked.

    Every method takes ``lengths_or_mask``: ``None`` (every position real), ``lengths [B]``
    (integer, each in ``1..T``), or a bool mask (``[B, T]``, or ``[T, B]`` time first) that is
    True at real tokens and False at padding, and must be a prefix mask (each row's real tokens
    come first).  Padding never changes a value or a gradient.  Half-precision emissions are
    computed in float32 (results in float32, gradients in the emissions' dtype).
    """

    def __init__(
        self,
        num_tags: int,
        constraints: Tensor | tuple | None = None,
        batch_first: bool = True,
        validate_args: bool | None = None,
    ):
        super().__init__()
        if not isinstance(num_tags, int) or num_tags < 1:
            raise ValueError(f"num_tags must be a positive int, got {num_tags!r}")
        self.num_tags = num_tags
        self.batch_first = batch_first
        self.validate_args = validate_args
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        allowed, allowed_start, allowed_end = _constraint_masks(constraints, num_tags)
        self.register_buffer("allowed_transitions", allowed)
        self.register_buffer("allowed_start", allowed_start)
        self.register_buffer("allowed_end", allowed_end)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Scores drawn from ``U(-0.1, 0.1)``, as pytorch-crf initialises them."""
        for p in (self.transitions, self.start_transitions, self.end_transitions):
            nn.init.uniform_(p, -0.1, 0.1)

    def extra_repr(self) -> str:
        constrained = [
            n for n in ("allowed_transitions", "allowed_start", "allowed_end") if getattr(self, n) is not None
        ]
        return f"num_tags={self.num_tags}, batch_first={self.batch_first}, constraints={constrained or None}"

    # ---- the chain ---------------------------------------------------------------------------
    def distribution(self, emissions: Tensor, lengths_or_mask: Tensor | None = None) -> ChainPosterior:
        """The conditional distribution ``p(tags | emissions)`` over tag sequences.

        Args:
            emissions: float ``[B, T, K]`` (``[T, B, K]`` with ``batch_first=False``), finite.
            lengths_or_mask: ``None``, ``lengths [B]`` integer, or a bool prefix mask
                (True = real token), as described in :class:`ChainCRF`.

        Returns:
            A :class:`~latentnlp.ChainPosterior` over ``[B, T]`` tag sequences (batch first in
            either layout) with this layer's start, transition and end scores: ``log_partition``,
            ``marginals``, ``argmax``, ``kbest``, ``log_prob``, ``sample``, ``entropy``...
        """
        emissions, lengths = self._checked_inputs(emissions, lengths_or_mask)
        # the values were checked here: the chain need not check them again
        return ChainPosterior(*self._chain(emissions, lengths), lengths, validate_args=False)

    def loss(
        self,
        emissions: Tensor,
        tags: Tensor,
        lengths_or_mask: Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int | None = IGNORE_INDEX,
    ) -> Tensor:
        r"""Negative log-likelihood ``-log p(tags | emissions) = log Z(x) - s(tags)``.

        Args:
            emissions: float ``[B, T, K]`` (``[T, B, K]`` with ``batch_first=False``), finite.
            tags: integer ``[B, T]`` (``[T, B]``) in ``0..K-1`` at real positions; entries equal
                to ``ignore_index`` are padding too.
            lengths_or_mask: ``None``, ``lengths [B]`` integer, or a bool prefix mask
                (True = real token), as described in :class:`ChainCRF`.
            reduction: ``"mean"`` (default: the average over the ``B`` sequences), ``"sum"``,
                ``"token_mean"`` (the sum divided by the number of real tokens) or ``"none"``.
            ignore_index: a tag value that marks padding (``None``: no such value).  The real
                positions of a row (those not padding by ``lengths_or_mask`` nor ignored) must
                be a prefix: an ignored tag before a real one is a ``ValueError``.

        Returns:
            ``[B]`` float with ``reduction="none"``, else a scalar.  A tag sequence that the
            constraints disallow has loss ``+inf``.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        emissions = self._batch_first_emissions(emissions)
        if not isinstance(tags, Tensor) or tags.is_floating_point() or tags.dtype == torch.bool:
            raise ValueError(
                "tags must be an integer tensor, got "
                + (f"{tags.dtype} {describe(tags)}" if isinstance(tags, Tensor) else type(tags).__name__)
            )
        tags = self._batch_first(tags, "tags")
        if tags.shape != emissions.shape[:2]:
            raise ValueError(f"tags must have shape {self._layout(emissions)} to match emissions, got {describe(tags)}")
        mask, given_lengths = self._real_mask(emissions, lengths_or_mask)
        kept = mask if ignore_index is None else mask & (tags != ignore_index)
        self._check_values(emissions, mask, given_lengths, tags, kept, ignore_index)
        lengths = kept.sum(-1)
        # a row whose every tag is ignored (refused when validating) adds nothing to the loss
        present = lengths.clamp_min(1)
        posterior = ChainPosterior(*self._chain(emissions, present), present, validate_args=False)
        tags = torch.where(kept, tags, torch.zeros_like(tags)).long()
        nll = torch.where(lengths > 0, -posterior.log_prob(tags), 0.0)
        if reduction == "none":
            return nll
        if reduction == "sum":
            return nll.sum()
        if reduction == "mean":
            return nll.mean()
        return nll.sum() / kept.sum()

    def decode(
        self, emissions: Tensor, lengths_or_mask: Tensor | None = None, k: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The most likely tag sequences (Viterbi), or the ``k`` most likely.

        The paths of :meth:`distribution`'s ``argmax`` and ``kbest``, computed by the same
        kernels (:func:`latentnlp.chain.viterbi`, :func:`latentnlp.chain.kbest_viterbi`) called
        directly, without building the distribution: they never read padding.

        Args:
            emissions: float ``[B, T, K]`` (``[T, B, K]`` with ``batch_first=False``), finite.
            lengths_or_mask: ``None``, ``lengths [B]`` integer, or a bool prefix mask
                (True = real token), as described in :class:`ChainCRF`.
            k: ``None`` for the single best path, else the number of best paths.

        Returns:
            ``k=None``: long ``[B, T]`` (``[T, B]``) tags, 0 at padding.  pytorch-crf returns a
            list of lists instead; ``[row[:n] for row, n in zip(paths.tolist(), lengths.tolist())]``
            is that (one ``tolist`` for the batch: a call per row costs more than the slicing).
            With ``k``: ``(paths [k, B, T] long, scores [k, B] float)``, best first (``[k, T, B]``
            time first); ``scores`` are the paths' ``s(y)``, ``-inf`` where fewer than ``k``
            allowed paths exist (those paths are then arbitrary).
        """
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be None or a positive int, got {k!r}")
        # inference mode: the kernels' thousands of small operations skip autograd's bookkeeping
        # (version counters), which no_grad keeps; the results are cloned out of it, so they are
        # ordinary tensors that a caller may modify in place
        with torch.inference_mode():
            emissions, lengths = self._checked_inputs(emissions, lengths_or_mask)
            start, trans, emit = self._chain(emissions, lengths)
            init, transition = start.expand(emit.shape[0], -1), DenseTransition(trans)
            if k is None:
                paths = chain.viterbi(init, transition, emit, lengths)
            else:
                paths, scores = chain.kbest_viterbi(init, transition, emit, lengths, k)
        if k is None:
            return self._in_layout(paths.clone(), batch_dim=0)
        return self._in_layout(paths.clone(), batch_dim=1), scores.clone()

    def marginals(self, emissions: Tensor, lengths_or_mask: Tensor | None = None) -> Tensor:
        """Posterior tag marginals ``p(y_t = k | emissions)``.

        Args:
            emissions: float ``[B, T, K]`` (``[T, B, K]`` with ``batch_first=False``), finite.
            lengths_or_mask: ``None``, ``lengths [B]`` integer, or a bool prefix mask
                (True = real token), as described in :class:`ChainCRF`.

        Returns:
            float ``[B, T, K]`` (``[T, B, K]``), each real position summing to 1, zero at padding.
        """
        return self._in_layout(self.distribution(emissions, lengths_or_mask).marginals, batch_dim=0)

    def _chain(self, emissions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(start [K], W [K, K], x' [B, T, K])`` of the module docstring for batch-first ``emissions``.

        Constrained entries ``-inf``; all three in the computation dtype (half precision: float32);
        ``x'`` is a new tensor, the end scores added at each row's position ``lengths - 1``.
        """
        trans = _allowed_or_impossible(self.transitions, self.allowed_transitions)
        start = _allowed_or_impossible(self.start_transitions, self.allowed_start)
        end = _allowed_or_impossible(self.end_transitions, self.allowed_end)
        dtype = computation_dtype(emissions.dtype, trans.dtype)
        batch = emissions.shape[0]
        rows = torch.arange(batch, device=emissions.device)
        ends = end.to(dtype).expand(batch, self.num_tags)
        emit = emissions.to(dtype).index_put((rows, lengths - 1), ends, accumulate=True)  # out of place
        return start.to(dtype), trans.to(dtype), emit

    # ---- inputs ------------------------------------------------------------------------------
    def _validating(self) -> bool:
        return is_validating(self.validate_args)

    def _layout(self, emissions: Tensor) -> str:
        batch, steps, _ = emissions.shape
        return f"[B, T] = [{batch}, {steps}]" if self.batch_first else f"[T, B] = [{steps}, {batch}]"

    def _batch_first(self, x: Tensor, name: str) -> Tensor:
        """``x`` with batch and time swapped when the layer is time first."""
        if x.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions, got {describe(x)}")
        return x if self.batch_first else x.transpose(0, 1)

    def _in_layout(self, x: Tensor, batch_dim: int) -> Tensor:
        """A batch-first result (batch at ``batch_dim``, time after it) in the layer's layout."""
        return x if self.batch_first else x.transpose(batch_dim, batch_dim + 1)

    def _batch_first_emissions(self, emissions: Tensor) -> Tensor:
        if not isinstance(emissions, Tensor) or not emissions.is_floating_point():
            raise ValueError(
                "emissions must be a floating-point tensor, got "
                + (f"{emissions.dtype}" if isinstance(emissions, Tensor) else type(emissions).__name__)
            )
        layout = "[B, T, K]" if self.batch_first else "[T, B, K]"
        if emissions.dim() != 3 or emissions.shape[-1] != self.num_tags:
            raise ValueError(
                f"emissions must have shape {layout} with K = num_tags = {self.num_tags}, got {describe(emissions)}"
            )
        if emissions.shape[0] == 0 or emissions.shape[1] == 0:
            raise ValueError(
                f"emissions must have B >= 1 and T >= 1 (every row needs a real position), got {describe(emissions)}"
            )
        return self._batch_first(emissions, "emissions")

    def _checked_inputs(self, emissions: Tensor, lengths_or_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(emissions [B, T, K], lengths [B])``, batch first, shapes and (when validating) values checked."""
        emissions = self._batch_first_emissions(emissions)
        mask, given_lengths = self._real_mask(emissions, lengths_or_mask)
        self._check_values(emissions, mask, given_lengths)
        return emissions, mask.sum(-1)

    def _real_mask(self, emissions: Tensor, lengths_or_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(mask [B, T], lengths [B] or None)`` for batch-first ``emissions``: the bool mask of the
        real positions and the lengths it was made from, if given.  Shapes and dtypes are checked
        here, values by :meth:`_check_values`."""
        batch, steps, _ = emissions.shape
        given = lengths_or_mask
        if given is None:
            return torch.ones(batch, steps, dtype=torch.bool, device=emissions.device), None
        if isinstance(given, Tensor) and given.dtype == torch.bool:
            mask = self._batch_first(given, "mask").to(emissions.device)
            if mask.shape != (batch, steps):
                raise ValueError(
                    f"mask must have shape {self._layout(emissions)} to match emissions, got {describe(given)}"
                )
            return mask, None
        if isinstance(given, Tensor) and not given.is_floating_point() and given.dim() == 1:
            if given.shape != (batch,):
                raise ValueError(f"lengths must have shape [B] = [{batch}], got {describe(given)}")
            lengths = given.to(device=emissions.device, dtype=torch.long)
            return lengths_to_mask(lengths, steps), lengths
        what = f"{given.dtype} {describe(given)}" if isinstance(given, Tensor) else type(given).__name__
        raise ValueError(
            f"lengths_or_mask must be None, integer lengths [B] or a bool mask {self._layout(emissions)}, got {what}"
        )

    def _check_values(
        self,
        emissions: Tensor,
        mask: Tensor,
        lengths: Tensor | None = None,
        tags: Tensor | None = None,
        kept: Tensor | None = None,
        ignore_index: int | None = None,
    ) -> None:
        """When validating: ``ValueError`` for a bad value of the inputs or the parameters.

        ``mask [B, T]`` marks the real positions (from ``lengths [B]``, if given); with ``tags``,
        ``kept`` marks those of them whose tag is not ``ignore_index``.  Refused: lengths outside
        ``1..T``, a mask that is not a prefix, a row with no real position, a NaN or ``+-inf``
        emission at a real position, with ``tags``: an ignored tag before a real one, a row with
        every tag ignored, a real tag outside ``0..K-1``; and a NaN or ``+-inf`` parameter.

        The well-formed case costs one read from the device and no full pass besides a sum:
        each condition is first tested by one small reduction, the finiteness of the emissions
        and of the parameters by that of their sums (NaN and ``+-inf`` reach a sum, so a finite
        sum has finite terms; an overflowing sum or non-finite padding merely sends the call on
        to the exact checks).  Only when a test fires do the exact checks run, in the order
        above, and the first that fails raises with the values and positions it found.
        """
        if not self._validating():
            return
        steps = mask.shape[1]
        params = (self.transitions, self.start_transitions, self.end_transitions)
        with torch.no_grad():
            total = emissions.sum(dtype=computation_dtype(emissions.dtype))
            flags = [
                ~mask[:, 0].all(),
                (mask[:, 1:] & ~mask[:, :-1]).any(),
                ~torch.isfinite(total),
                ~torch.isfinite(torch.stack([p.sum() for p in params]).sum()),
            ]
            if lengths is not None:
                flags.append(lengths.max() > steps)  # lengths < 1 show as a row without a real position
            if tags is not None:
                out_of_range = (tags < 0) | (tags >= self.num_tags)
                flags += [~kept[:, 0].all(), (kept[:, 1:] & ~kept[:, :-1]).any(), (kept & out_of_range).any()]
            if not bool(torch.stack(flags).any()):
                return
        if lengths is not None:
            if lengths.min() < 1 or lengths.max() > steps:
                raise ValueError(
                    f"lengths must lie in 1..T = 1..{steps}, got values from {int(lengths.min())} "
                    f"to {int(lengths.max())}"
                )
        else:
            _check_prefix(mask, "mask", "False (padding) before True (real) at position")
        _check_nonempty(mask, "lengths_or_mask")
        bad = ~torch.isfinite(emissions) & mask.unsqueeze(-1)
        if bad.any():
            b, t, k = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"emissions must be finite at real positions (use constraints for impossible "
                f"tags), got {float(emissions[b, t, k])} at {int(bad.sum())} entries, the first "
                f"at batch row {b}, position {t}, tag {k} (batch-first indices)"
            )
        if tags is not None:
            what = f"ignore_index={ignore_index} (or padding) before a real tag at position"
            _check_prefix(kept, "tags", what)
            _check_nonempty(kept, "tags")
            if (kept & ((tags < 0) | (tags >= self.num_tags))).any():
                real = tags[kept]
                raise ValueError(
                    f"tags must lie in 0..{self.num_tags - 1} at real positions (or equal "
                    f"ignore_index={ignore_index}), got values from {int(real.min())} to {int(real.max())}"
                )
        for name, p in zip(("transitions", "start_transitions", "end_transitions"), params):
            if not bool(torch.isfinite(p).all()):
                raise ValueError(
                    f"{name} must be finite, got {int((~torch.isfinite(p)).sum())} NaN or inf "
                    f"entries (a diverged training step?)"
                )


def _check_prefix(mask: Tensor, name: str, what: str) -> None:
    """ValueError naming the first row of bool ``mask [B, T]`` where a False precedes a True."""
    gap = ~mask[:, :-1] & mask[:, 1:]
    if gap.any():
        row, t = (int(i) for i in gap.nonzero()[0])
        raise ValueError(f"{name}: real positions must be a prefix of each row, but batch row {row} has {what} {t + 1}")


def _check_nonempty(mask: Tensor, name: str) -> None:
    """ValueError naming the first row of ``mask [B, T]`` without a real position."""
    empty = ~mask.any(-1)
    if empty.any():
        raise ValueError(
            f"{name}: every row needs at least one real position, but batch row {int(empty.nonzero()[0])} has none"
        )


def _allowed_or_impossible(scores: Tensor, allowed: Tensor | None) -> Tensor:
    """``scores`` where ``allowed``, ``-inf`` elsewhere (zero gradient there); ``scores`` if no mask."""
    if allowed is None:
        return scores
    return torch.where(allowed, scores, torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device))


def _constraint_masks(constraints, num_tags: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(allowed_transitions [K, K], allowed_start [K], allowed_end [K])``, each bool or ``None``."""
    if constraints is None:
        return None, None, None
    parts = (constraints,) if isinstance(constraints, Tensor) else tuple(constraints)
    if not 1 <= len(parts) <= 3:
        raise ValueError(
            f"constraints must be a bool [K, K] tensor or a tuple (transitions, start, end), got {len(parts)} entries"
        )
    parts = parts + (None,) * (3 - len(parts))
    names = ("allowed transitions", "allowed start", "allowed end")
    shapes = ((num_tags, num_tags), (num_tags,), (num_tags,))
    out = []
    for name, shape, x in zip(names, shapes, parts):
        if x is not None and (not isinstance(x, Tensor) or x.dtype != torch.bool or tuple(x.shape) != shape):
            what = f"{x.dtype} {describe(x)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"constraints: {name} must be a bool tensor of shape {list(shape)}, got {what}")
        out.append(None if x is None else x.clone())
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# tagging schemes
# ----------------------------------------------------------------------------------------------
def _parse_tags(tags: Sequence[str], prefixes: str) -> list[tuple[str, str]]:
    """``[(prefix, label)]`` of tags ``"O"`` or ``"<prefix>-<label>"`` with ``prefix`` in ``prefixes``."""
    if not len(tags):
        raise ValueError("tags must name at least one tag, got none")
    parsed = []
    for tag in tags:
        prefix, dash, label = str(tag).partition("-")
        if tag == "O":
            parsed.append(("O", ""))
        elif dash and label and prefix in tuple(prefixes):
            parsed.append((prefix, label))
        else:
            raise ValueError(f"tags: {tag!r} is neither 'O' nor one of {', '.join(p + '-X' for p in prefixes)}")
    if len(set(tags)) != len(tags):
        raise ValueError(f"tags must be distinct, got {list(tags)}")
    return parsed


def _masks(parsed, follows, starts, ends) -> tuple[Tensor, Tensor, Tensor]:
    """Bool ``[K, K]``, ``[K]``, ``[K]`` tensors from the predicates on ``(prefix, label)`` pairs."""
    return (
        torch.tensor([[follows(a, b) for b in parsed] for a in parsed], dtype=torch.bool),
        torch.tensor([starts(a) for a in parsed], dtype=torch.bool),
        torch.tensor([ends(a) for a in parsed], dtype=torch.bool),
    )


def bio_constraints(tags: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Allowed transitions, start and end tags of the BIO scheme (tags ``"O"``, ``"B-X"``, ``"I-X"``).

    ``I-X`` may only follow ``B-X`` or ``I-X`` and may not start a sequence; everything else is
    allowed (a sequence may end on any tag).

    Args:
        tags: the ``K`` tag names in the layer's tag order, e.g. ``["O", "B-PER", "I-PER"]``.

    Returns:
        ``(allowed_transitions [K, K], allowed_start [K], allowed_end [K])``, bool, for
        ``ChainCRF(K, constraints=...)``; ``allowed_transitions[i, j]``: tag ``i`` may precede ``j``.
    """
    parsed = _parse_tags(tags, "BI")
    return _masks(
        parsed, lambda a, b: b[0] != "I" or (a[0] in "BI" and a[1] == b[1]), lambda a: a[0] != "I", lambda a: True
    )


def bioes_constraints(tags: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Allowed transitions, start and end tags of the BIOES scheme (``O``, ``B-X``, ``I-X``, ``E-X``, ``S-X``).

    Inside an entity (after ``B-X`` or ``I-X``) only ``I-X`` or ``E-X`` may follow; outside one
    (after ``O``, ``E-X`` or ``S-X``) only ``O``, ``B-Y`` or ``S-Y``.  A sequence may not start
    with ``I-`` or ``E-`` nor end with ``B-`` or ``I-``.

    Args:
        tags: the ``K`` tag names in the layer's tag order, e.g. ``["O", "B-PER", "I-PER", "E-PER", "S-PER"]``.

    Returns:
        ``(allowed_transitions [K, K], allowed_start [K], allowed_end [K])``, bool, for
        ``ChainCRF(K, constraints=...)``; ``allowed_transitions[i, j]``: tag ``i`` may precede ``j``.
    """
    parsed = _parse_tags(tags, "BIES")

    def follows(a, b):
        if b[0] in "IE":
            return a[0] in "BI" and a[1] == b[1]
        return a[0] in "OES"

    return _masks(parsed, follows, lambda a: a[0] not in "IE", lambda a: a[0] not in "BI")
