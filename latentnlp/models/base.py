"""The `LatentModel` contract shared by every model of the library.

A model defines a joint ``p(x, z | c)`` over observed text ``x`` (given a
context ``c``: a source sentence, a history) and latent structure ``z``.
The trainer and the evaluator only call :meth:`LatentModel.loss`,
:meth:`LatentModel.log_marginal`, :meth:`LatentModel.iwae` and
:meth:`LatentModel.generate`; a model declares which training objectives it
supports in :attr:`LatentModel.objectives`.

Batches are mappings from names to tensors (batch first).  Language-model
batches carry ``inputs [B, T]``, ``targets [B, T]`` and ``lengths [B]``;
positions at or past a length are padding and never change a result.

The loss is always *per target token*: the sum over the batch of the
negative objective divided by the number of target tokens, so perplexity is
``exp(total nll / total tokens)`` with ``<eos>`` counted and BOS not.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from latentnlp.objectives import ELBO, Loss  # defined with the objectives; re-exported here

Batch = Mapping[str, object]

OBJECTIVES = ("marginal", "elbo", "iwae", "wake-sleep")


class IntractableError(NotImplementedError):
    """Raised by :meth:`LatentModel.log_marginal` when ``log p(x)`` cannot be computed exactly."""


class UnsupportedObjectiveError(ValueError):
    """Raised by :meth:`LatentModel.loss` for an objective the model does not declare."""


def language_model_targets(batch: Batch) -> tuple[Tensor, Tensor]:
    """``(targets [B, T], lengths [B])`` of a language-model batch, their types and shapes checked
    (integer tensors; ``lengths`` one per row); values are left to the model."""
    targets, lengths = batch["targets"], batch["lengths"]
    if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.is_floating_point():
        raise ValueError(
            f"batch['targets'] must be an integer tensor of shape [B, T], got {getattr(targets, 'shape', targets)}"
        )
    if not isinstance(lengths, Tensor) or lengths.shape != targets.shape[:1] or lengths.is_floating_point():
        raise ValueError(
            f"batch['lengths'] must be an integer tensor of shape [B] = [{targets.shape[0]}], got "
            + (f"{lengths.dtype} {tuple(lengths.shape)}" if isinstance(lengths, Tensor) else repr(lengths))
        )
    return targets, lengths


def check_language_model_values(targets: Tensor, lengths: Tensor, vocab_size: int, ids_note: str = "") -> None:
    """Lengths in ``1..T`` and ids in ``0..V-1`` of a language-model batch whose padding (and any
    ignored target) is already id 0, in one synchronisation; ``ValueError`` naming the range seen,
    with ``ids_note`` after the ids' range (e.g. what else an id may be)."""
    if not targets.numel():
        return
    steps = targets.shape[1]
    low_len, high_len, low_id, high_id = torch.stack(
        [lengths.min(), lengths.max(), targets.min(), targets.max()]
    ).tolist()
    if low_len < 1 or high_len > steps:
        raise ValueError(f"batch['lengths'] must lie in 1..T = 1..{steps}, got {low_len}..{high_len}")
    if low_id < 0 or high_id >= vocab_size:
        raise ValueError(
            f"batch['targets'] must lie in 0..V-1 = 0..{vocab_size - 1}{ids_note}, got {low_id}..{high_id}"
        )


class LatentModel(nn.Module):
    """Base class: a latent-variable model of text behind one API.

    Subclasses implement some of :meth:`log_marginal`, :meth:`elbo`,
    :meth:`iwae`, :meth:`wake_sleep`, :meth:`posterior`, :meth:`generate`
    and :meth:`num_tokens`, and list the objectives they support in
    :attr:`objectives`.  ``forward`` is :meth:`loss`, so a model wrapped in
    ``DistributedDataParallel`` is trained by calling it.

    Every model records the arguments it was constructed with
    (:attr:`constructor`), so a checkpoint can rebuild it
    (:meth:`from_constructor`) without the code that built it.
    """

    #: training objectives this model supports, a subset of :data:`OBJECTIVES`
    objectives: ClassVar[tuple[str, ...]] = ()

    # ---- construction record ----------------------------------------------------------------
    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap each subclass's own ``__init__`` to record the call that built the instance.

        The outermost ``__init__`` (that of the class the caller named) records first, so a
        subclass calling ``super().__init__(...)`` with other arguments does not overwrite it.
        """
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "_constructor" not in self.__dict__:
                object.__setattr__(self, "_constructor", _record(type(self), init, self, args, kw))
            init(self, *args, **kw)

        cls.__init__ = recording_init

    @property
    def constructor(self) -> dict[str, Any] | None:
        """``{"class": "module.QualName", "args": [...], "kwargs": {...}}``: how this model was built.

        A model built by a factory classmethod marked with :func:`records_construction` (such as
        ``LatentAlignmentSeq2Seq.from_mode``) records that call instead, with ``"factory"`` naming it.
        None when an argument is not plain data (bool, int, float, str, None, and lists, tuples
        and string-keyed dicts of them), which a checkpoint could not hold.
        """
        return self.__dict__.get("_constructor")

    @staticmethod
    def from_constructor(record: Mapping[str, Any]) -> LatentModel:
        """A new model built as :attr:`constructor` records it (freshly initialised parameters)."""
        if "<locals>" in record["class"]:
            raise ValueError(
                f"{record['class']} is defined inside a function and cannot be imported; build the model yourself"
            )
        module_name, qualname = _split_class_path(record["class"])
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
        if not (isinstance(target, type) and issubclass(target, LatentModel)):
            raise TypeError(f"{record['class']} is not a LatentModel")
        build = getattr(target, record["factory"]) if "factory" in record else target
        return build(*record["args"], **record["kwargs"])

    # ---- quantities -------------------------------------------------------------------------
    def log_marginal(self, batch: Batch) -> Tensor:
        """Exact ``log p(x | c)`` summed over the target tokens of each example: ``[B]``."""
        raise IntractableError(f"{type(self).__name__} has no exact log marginal")

    def elbo(self, batch: Batch, *, estimator: str | None = None, num_samples: int = 1, kl_weight: float = 1.0) -> ELBO:
        """Evidence lower bound per example (see :class:`ELBO`)."""
        raise UnsupportedObjectiveError(f"{type(self).__name__} has no variational posterior")

    def iwae(self, batch: Batch, num_samples: int) -> Tensor:
        """Importance-weighted bound ``log 1/S sum_s p(x, z_s) / q(z_s | x)``, ``[B]``.

        Tractable models return the exact marginal (the bound is tight).
        """
        return self.log_marginal(batch)

    def wake_sleep(self, batch: Batch) -> Loss:
        """Wake-sleep surrogate loss (model by the wake phase, q by the sleep phase)."""
        raise UnsupportedObjectiveError(f"{type(self).__name__} does not support wake-sleep")

    def posterior(self, batch: Batch) -> torch.distributions.Distribution:
        """The exact posterior ``p(z | x, c)`` where tractable; a model whose only posterior is an
        amortised family (a VAE) returns ``q(z | x, c)``; a model with an exact posterior beyond the
        size it can compute raises :class:`IntractableError` (its approximation has its own name)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose a posterior")

    def generate(self, batch: Batch, **kwargs) -> object:
        """Samples, greedy or beam output, where the model generates."""
        raise NotImplementedError(f"{type(self).__name__} does not generate")

    def inference_parameters(self) -> list[nn.Parameter]:
        """The parameters of the inference network ``q(z | x)`` alone (the rest are the generative model's).

        The trainer's aggressive schedule (:mod:`latentnlp.training.aggressive`) updates these
        alone in its inner loop.  Models without a separate inference network raise
        ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not name an inference network")

    def num_tokens(self, batch: Batch) -> Tensor:
        """Number of target tokens of each example ``[B]`` (the perplexity denominator)."""
        lengths = batch["lengths"]
        assert isinstance(lengths, Tensor)
        return lengths

    # ---- carried state (streams) ------------------------------------------------------------
    def reset_state(self) -> None:
        """Forget any state carried between consecutive batches of a stream (BPTT).

        The trainer calls it at the start of every pass over a data set.
        Models that carry no state inherit this no-op.
        """

    # ---- the one entry point of the trainer -------------------------------------------------
    def loss(self, batch: Batch, objective: str = "marginal", **kwargs) -> Loss:
        """Per-token loss for ``objective`` and per-example metrics.

        ``marginal``: ``-sum log p(x) / tokens``, metric ``nll``; ``elbo``:
        ``-sum surrogate / tokens`` (``kwargs`` go to :meth:`elbo`), metrics
        ``neg_elbo`` (the true bound), ``kl`` and ``reconstruction``; ``iwae``:
        ``-sum iwae / tokens``, metric ``nll``; ``wake-sleep``: the model's
        :meth:`wake_sleep` loss.
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective not in self.objectives:
            raise UnsupportedObjectiveError(
                f"{type(self).__name__} supports objectives {self.objectives}, not {objective!r}"
            )
        if objective == "wake-sleep":
            return self.wake_sleep(batch, **kwargs)
        tokens = self.num_tokens(batch).to(torch.float64)
        metrics: dict[str, Tensor] = {}
        if objective == "marginal":
            log_px = self.log_marginal(batch)
            surrogate = log_px
        elif objective == "elbo":
            bound = self.elbo(batch, **kwargs)
            log_px, surrogate = bound.value, bound.surrogate
            metrics["kl"] = bound.kl.detach()
            metrics["reconstruction"] = bound.reconstruction.detach()
        else:
            log_px = self.iwae(batch, **kwargs)
            surrogate = log_px
        metrics["neg_elbo" if objective == "elbo" else "nll"] = -log_px.detach()
        metrics["tokens"] = tokens
        value = -surrogate.sum() / tokens.sum().clamp_min(1).to(surrogate.dtype)
        return Loss(value=value, metrics=metrics)

    def forward(self, batch: Batch, objective: str = "marginal", **kwargs) -> Loss:
        return self.loss(batch, objective, **kwargs)


def records_construction(factory: Any) -> classmethod:
    """Mark a factory classmethod of a :class:`LatentModel` as the call its models record.

    Use it in place of ``@classmethod`` on a factory whose arguments are plain data while the
    constructor's are not (modules, say): the built model's :attr:`LatentModel.constructor` then
    names the factory and its arguments, so a checkpoint can rebuild the model.
    """

    @functools.wraps(factory)
    def build(cls, *args, **kwargs):
        model = factory(cls, *args, **kwargs)
        record = _record(cls, factory, cls, args, kwargs)
        if record is not None:
            record["factory"] = factory.__name__
        object.__setattr__(model, "_constructor", record)
        return model

    return classmethod(build)


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _record(cls: type, init: Any, instance: object, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The constructor record of ``cls(*args, **kwargs)``, or None when it is not plain data."""
    try:
        bound = inspect.signature(init).bind(instance, *args, **kwargs)
    except TypeError:  # the call itself is wrong: let __init__ raise its own error
        return None
    args, kwargs = list(bound.args[1:]), dict(bound.kwargs)
    if not (_is_plain(args) and _is_plain(kwargs)):
        return None
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "args": args, "kwargs": kwargs}


def _split_class_path(path: str) -> tuple[str, str]:
    """``"pkg.mod.Outer.Inner"`` -> ``("pkg.mod", "Outer.Inner")``: the longest importable module prefix."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return module, ".".join(parts[cut:])
    raise ImportError(f"no importable module in the class path {path!r}")
